"""A Gymnasium environment over the shopper simulator: one episode is one shopper's session.

At each step the agent shows a slate at the shopper's latest recommendation opportunity (a view or
a rec_request); the shopper reacts (``ShopperSimulator.respond``) and then browses on until the next
opportunity or the end of the session.

- Action: ``MultiDiscrete([num_items] * slate_size)``, item indices by position (a repeated item
  counts only at its first position), or ``Discrete(num_items)`` when ``slate_size == 1``.
- Reward: the weighted feedback on the slate in this step: click 1, add_to_cart 3, favorite 2,
  purchase 10 (``REWARD_WEIGHTS``).
- Terminated: the session ended (the shopper left). Truncated: ``max_steps`` slates were shown.
- Info: ``user_id``, ``session_id``, ``time_ms`` (simulated time of the shopper's latest event, the
  time to ask ``env.unwrapped.simulator.oracle_slate`` about), ``slates_shown``; after a step also
  ``clicked_position`` (-1 for none) and ``response_events``.
- ``reset(seed=...)`` rebuilds the simulator with the env's new generator: the catalogue and the
  shoppers come from ``config.seed`` and stay the same, the behaviour follows ``seed``. Later
  unseeded resets start the next session of the same simulated shop, a Poisson gap later in
  simulated time (``session_start_rate_per_minute``), so preferences drift across episodes as fast
  as in the full simulation. ``options={"user_id": "shopper-0042"}`` picks the shopper.

Observation (float32, length ``2 * C + 13`` for C = num_categories), what a recommender could know:

====================  =============================================================================
index                 meaning
====================  =============================================================================
0 .. C-1              one-hot category of the item on screen (last viewed or clicked; 0 before any)
C                     that item's log price minus the catalogue's mean log price, clipped to [-5, 5]
C+1                   slates shown so far / max_steps
C+2, C+3              sin and cos of the time of day (UTC)
C+4 .. C+10           one-hot of the last event's type (``schemas.messages.EVENT_TYPES`` order)
C+11 .. 2C+10         share of the session's viewed or clicked items in each category
2C+11                 log1p(items in the cart), clipped to [0, 5]
2C+12                 log1p(slate clicks so far in the session), clipped to [0, 5]
====================  =============================================================================
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from schemas.messages import EVENT_TYPES, ClickEvent, Recommendation, RecommendedItem
from services.simulator.config import SimulatorConfig
from services.simulator.core import OPPORTUNITY_TYPES, REWARD_WEIGHTS, ShopperSimulator

_LOG_CLIP = 5.0
_EVENT_TYPE_INDEX = {event_type: i for i, event_type in enumerate(EVENT_TYPES)}


def observation_size(num_categories: int) -> int:
    """Length of the observation vector for a catalogue with num_categories categories."""
    return 2 * num_categories + 13


class ShopperEnv(gymnasium.Env[np.ndarray, Any]):
    """Recommend slates to one simulated shopper per episode; reward is the feedback on them."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (the type gymnasium.Env declares)

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        slate_size: int = 10,
        max_steps: int = 50,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"ShopperEnv has no render modes, got render_mode={render_mode!r}")
        if slate_size < 1:
            raise ValueError(f"slate_size must be at least 1, got {slate_size}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.config = config if config is not None else SimulatorConfig()
        self.slate_size = slate_size
        self.max_steps = max_steps
        self.render_mode = render_mode
        n, c = self.config.num_items, self.config.num_categories
        self.action_space: spaces.Space[Any] = (
            spaces.Discrete(n) if slate_size == 1 else spaces.MultiDiscrete([n] * slate_size)
        )
        low = np.zeros(observation_size(c), dtype=np.float32)
        high = np.ones(observation_size(c), dtype=np.float32)
        low[c], high[c] = -_LOG_CLIP, _LOG_CLIP
        low[c + 2 : c + 4] = -1.0
        high[2 * c + 11 :] = _LOG_CLIP
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

        self._sim: ShopperSimulator | None = None
        self._session_start_ms = self.config.start_time_ms
        self._time_ms = self.config.start_time_ms
        self._recommendations = 0
        self._user_id = ""
        self._session_id = ""
        self._done = True
        self._reset_session()

    @property
    def simulator(self) -> ShopperSimulator:
        """The simulator behind the env (after the first reset): oracle, utilities, stats."""
        if self._sim is None:
            raise RuntimeError("call reset() first")
        return self._sim

    def _reset_session(self) -> None:
        c = self.config.num_categories
        self._steps = 0
        self._clicks = 0
        self._cart: set[str] = set()
        self._category_counts = np.zeros(c, dtype=np.float64)  # (C,)
        self._on_screen: str | None = None
        self._last_event: ClickEvent | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None or self._sim is None:
            self._sim = ShopperSimulator(self.config, rng=self.np_random)
            self._session_start_ms = self.config.start_time_ms
        elif not self._done:
            self._sim.end_session(self._user_id)
        sim = self._sim
        if options and "user_id" in options:
            self._user_id = str(options["user_id"])
        else:
            self._user_id = sim.user_ids[int(self.np_random.integers(len(sim.user_ids)))]
        # Sessions start as the population's do (Poisson, session_start_rate_per_minute), so simulated
        # time and preference drift run as fast per session as in the full simulation.
        rate = self.config.session_start_rate_per_minute
        mean_gap_ms = 60_000.0 / rate if rate > 0 else 1000.0 * self.config.think_time_seconds
        self._session_start_ms += 1 + int(self.np_random.exponential(mean_gap_ms))
        self._time_ms = self._session_start_ms
        self._session_id = sim.start_session(self._user_id, self._session_start_ms)
        self._reset_session()
        self._done = not self._browse_to_opportunity()
        return self._observation(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done or self._last_event is None:
            raise RuntimeError("the episode is over: call reset() before step()")
        sim = self.simulator
        slate = np.atleast_1d(np.asarray(action, dtype=np.int64))  # (slate_size,)
        if slate.shape != (self.slate_size,) or slate.min() < 0 or slate.max() >= self.config.num_items:
            raise ValueError(f"action must be {self.slate_size} item indices in [0, {self.config.num_items})")
        last = self._last_event
        self._recommendations += 1
        rec = Recommendation(
            rec_id=f"env-rec-{self._recommendations}",
            user_id=self._user_id,
            items=[
                RecommendedItem(item_id=sim.item_ids[i], score=0.0, propensity=1.0) for i in slate.tolist()
            ],
            policy="env",
            model_version=0,
            explored=False,
            source_event_id=last.event_id,
            event_timestamp=last.timestamp,
            created_at=last.timestamp,
            session_id=self._session_id,
            request_id=last.request_id,
        )
        response = sim.respond(rec, last.timestamp)
        reward = 0.0
        clicked_position = -1
        for event in response:
            reward += REWARD_WEIGHTS.get(event.event_type, 0.0)
            if event.event_type == "click" and event.item_id is not None:
                clicked_position = [s.item_id for s in rec.items].index(event.item_id)
                self._clicks += 1
            self._track(event)
        self._steps += 1
        terminated = not self._browse_to_opportunity()
        truncated = not terminated and self._steps >= self.max_steps
        if truncated:
            sim.end_session(self._user_id)
        self._done = terminated or truncated
        info = self._info()
        info["clicked_position"] = clicked_position
        info["response_events"] = len(response)
        return self._observation(), reward, terminated, truncated, info

    def _browse_to_opportunity(self) -> bool:
        """Let the shopper act until a recommendation opportunity; False when the session ended."""
        sim = self.simulator
        while True:
            events = sim.step_session(self._user_id)
            if not events:
                return False
            for event in events:
                self._track(event)
            if events[-1].event_type in OPPORTUNITY_TYPES:
                return True

    def _track(self, event: ClickEvent) -> None:
        self._last_event = event
        self._time_ms = event.timestamp
        item_id = event.item_id
        if item_id is None:
            return
        if event.event_type in ("view", "click"):
            self._on_screen = item_id
            index = self.simulator.item_index(item_id)
            if index is not None:
                self._category_counts[self.simulator.catalogue.category[index]] += 1.0
        elif event.event_type == "add_to_cart":
            self._cart.add(item_id)
        elif event.event_type in ("purchase", "remove_from_cart"):
            self._cart.discard(item_id)

    def _observation(self) -> np.ndarray:
        c = self.config.num_categories
        obs = np.zeros(observation_size(c), dtype=np.float32)  # (2C + 13,)
        index = self.simulator.item_index(self._on_screen) if self._on_screen is not None else None
        if index is not None:
            catalogue = self.simulator.catalogue
            obs[catalogue.category[index]] = 1.0
            obs[c] = np.clip(catalogue.log_price_relative[index], -_LOG_CLIP, _LOG_CLIP)
        obs[c + 1] = min(self._steps / self.max_steps, 1.0)
        if self._last_event is not None:
            angle = 2.0 * math.pi * (self._last_event.timestamp % 86_400_000) / 86_400_000
            obs[c + 2], obs[c + 3] = math.sin(angle), math.cos(angle)
            obs[c + 4 + _EVENT_TYPE_INDEX[self._last_event.event_type]] = 1.0
        total = self._category_counts.sum()
        if total > 0:
            obs[c + 11 : 2 * c + 11] = self._category_counts / total
        obs[2 * c + 11] = min(math.log1p(len(self._cart)), _LOG_CLIP)
        obs[2 * c + 12] = min(math.log1p(self._clicks), _LOG_CLIP)
        return obs

    def _info(self) -> dict[str, Any]:
        return {
            "user_id": self._user_id,
            "session_id": self._session_id,
            "time_ms": self._time_ms,
            "slates_shown": self._steps,
        }
