"""The learner's core, shared by the streaming service and offline training: transitions in, updates out.

It owns the vocabulary (raw item id -> action index), the replay buffer and the train state, and turns
Transition messages into arrays. It does no I/O; the service feeds it and publishes what it makes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import msgspec
import numpy as np

from rl.batch import ObsBatch, TransitionBatch, empty_obs_batch, event_type_indices
from rl.networks import NetworkConfig, QNetwork
from rl.replay import ReplayBuffer
from rl.serialize import ENCODING, tree_from_bytes, tree_to_bytes
from rl.train import LearnerConfig, TrainState, create_train_state, reset_action_rows, update_many
from rl.vocabulary import Vocabulary
from schemas.messages import Observation, Transition
from services.learner.config import ModelSettings

MODEL_ENCODING = f"qrec-model-v1+{ENCODING}"


class ModelBundle(msgspec.Struct, frozen=True):
    """What a published model holds: everything a reader needs to score users."""

    format: int
    network_config: dict[str, Any]
    window: int
    feature_dim: int
    params: bytes
    vocabulary: bytes


def network_config_for(settings: ModelSettings) -> NetworkConfig:
    return NetworkConfig(
        num_actions=settings.vocabulary_capacity + 2,
        embed_dim=settings.embed_dim,
        hidden_sizes=settings.hidden(),
        dueling=settings.dueling,
        next_item_head=settings.sqn_weight > 0,
    )


def learner_config_for(settings: ModelSettings) -> LearnerConfig:
    return LearnerConfig(
        gamma=settings.gamma,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        double_dqn=settings.double_dqn,
        target_update=settings.target_update,  # type: ignore[arg-type]
        target_update_period=settings.target_update_period,
        polyak_tau=settings.polyak_tau,
        sqn_weight=settings.sqn_weight,
        seed=settings.seed,
    )


@dataclass
class UpdateMetrics:
    """Means over the updates of one fused call."""

    loss: float
    td_error_abs_mean: float
    q_mean: float
    q_max: float
    updates: int


class Trainer:
    """Vocabulary + replay buffer + train state, and the conversion from messages to arrays."""

    def __init__(self, settings: ModelSettings, feature_dim: int) -> None:
        self.settings = settings
        self.feature_dim = feature_dim
        self.window = settings.window
        self.network_config = network_config_for(settings)
        self.learner_config = learner_config_for(settings)
        self.network = QNetwork(self.network_config)
        self.vocabulary = Vocabulary(settings.vocabulary_capacity, settings.vocabulary_min_count)
        self.buffer = ReplayBuffer(
            settings.replay_capacity,
            window=self.window,
            feature_dim=feature_dim,
            prioritized=settings.prioritized,
        )
        self.state: TrainState = create_train_state(
            self.network_config,
            self.learner_config,
            empty_obs_batch(1, window=self.window, feature_dim=feature_dim),
            jax.random.key(settings.seed),
        )
        self.rng = np.random.default_rng(settings.seed)
        self._key = jax.random.key(settings.seed + 1)
        self.observed = 0
        self.seen_ids: OrderedDict[str, None] = OrderedDict()

    # -- messages to arrays -----------------------------------------------------------------------
    def _obs_arrays(self, observations: Sequence[Observation]) -> ObsBatch:
        size, window, dim = len(observations), self.window, self.feature_dim
        items = np.zeros((size, window), np.int32)  # (B, W)
        types = np.zeros((size, window), np.int32)  # (B, W)
        gaps = np.zeros((size, window), np.float32)  # (B, W)
        features = np.zeros((size, dim), np.float32)  # (B, D)
        lookup = self.vocabulary.lookup
        for row, obs in enumerate(observations):
            if len(obs.features) != dim:
                raise ValueError(f"observation has {len(obs.features)} features, the model expects {dim}")
            features[row] = obs.features
            recent = obs.recent_items[-window:]
            if recent:
                n = len(recent)
                items[row, window - n :] = lookup(recent)
                types[row, window - n :] = event_type_indices(obs.recent_event_types[-n:])
                gaps[row, window - n :] = np.log1p(np.asarray(obs.recent_gaps_seconds[-n:], np.float32))
        return ObsBatch(items=items, event_types=types, gaps=gaps, features=features)

    def add(self, transitions: Sequence[Transition]) -> int:
        """Drop already-seen transition ids, grow the vocabulary, fill the buffer; returns the new count."""
        fresh = []
        for transition in transitions:
            if transition.transition_id in self.seen_ids:
                continue
            self.seen_ids[transition.transition_id] = None
            fresh.append(transition)
        while len(self.seen_ids) > getattr(self.settings, "dedupe_ids", 200_000):
            self.seen_ids.popitem(last=False)
        if not fresh:
            return 0
        self.observed += len(fresh)
        ids: list[str] = []
        for transition in fresh:
            ids.append(transition.a_tm1)
            ids.extend(transition.obs_tm1.recent_items[-self.window :])
        reused = self.vocabulary.observe(ids, self.observed)
        if reused:
            self._key, key = jax.random.split(self._key)
            self.state = reset_action_rows(self.state, reused, key)
        self.buffer.add(self.to_batch(fresh))
        return len(fresh)

    def to_batch(self, transitions: Sequence[Transition]) -> TransitionBatch:
        """Arrays for a list of transitions (vocabulary lookups, padding, log gaps)."""
        obs_tm1 = self._obs_arrays([t.obs_tm1 for t in transitions])
        obs_t = self._obs_arrays([t.obs_t for t in transitions])
        return TransitionBatch(
            obs_tm1=obs_tm1,
            a_tm1=self.vocabulary.lookup([t.a_tm1 for t in transitions]),
            r_t=np.asarray([t.r_t for t in transitions], np.float32),
            discount_t=np.asarray([0.0 if t.done else 1.0 for t in transitions], np.float32),
            obs_t=obs_t,
            weights=np.ones((len(transitions),), np.float32),
        )

    # -- learning ---------------------------------------------------------------------------------
    def action_mask(self) -> np.ndarray:
        return self.vocabulary.allowed_mask()

    def train(self, num_updates: int) -> UpdateMetrics:
        """Run ``num_updates`` updates (a multiple of updates_per_call) from the replay buffer."""
        per_call = self.settings.updates_per_call
        calls = max(1, num_updates // per_call)
        totals = {"loss": 0.0, "td_error_abs_mean": 0.0, "q_mean": 0.0}
        q_max = float("-inf")
        mask = self.action_mask()
        for _ in range(calls):
            batches, indices, _ = self.buffer.sample_stacked(per_call, self.settings.batch_size, self.rng)
            self.state, metrics = update_many(
                self.state, batches, network=self.network, config=self.learner_config, action_mask=mask
            )
            if self.settings.prioritized:
                self.buffer.update_priorities(indices.reshape(-1), self.td_errors(batches))
            for name in totals:
                totals[name] += float(np.mean(metrics[name]))
            q_max = max(q_max, float(np.max(metrics["q_max"])))
        return UpdateMetrics(
            loss=totals["loss"] / calls,
            td_error_abs_mean=totals["td_error_abs_mean"] / calls,
            q_mean=totals["q_mean"] / calls,
            q_max=q_max,
            updates=calls * per_call,
        )

    def td_errors(self, batches: TransitionBatch) -> np.ndarray:
        """|TD error| per sampled transition under the current parameters (for priorities)."""
        flat = jax.tree.map(lambda leaf: np.reshape(leaf, (-1, *np.shape(leaf)[2:])), batches)
        return np.abs(self.evaluate_td(flat))

    def evaluate_td(self, batch: TransitionBatch) -> np.ndarray:
        """TD errors of a batch under the current online and target parameters (no update)."""
        from rl.value_learning import double_q_learning, q_learning

        gamma = self.learner_config.gamma
        q_tm1: Any = self.network.apply(self.state.params, batch.obs_tm1)  # (B, A)
        q_t: Any = self.network.apply(self.state.target_params, batch.obs_t)  # (B, A)
        discount: Any = gamma * np.asarray(batch.discount_t)  # (B,)
        if self.learner_config.double_dqn:
            selector: Any = self.network.apply(self.state.params, batch.obs_t)  # (B, A)
            errors = jax.vmap(double_q_learning)(q_tm1, batch.a_tm1, batch.r_t, discount, q_t, selector)
        else:
            errors = jax.vmap(q_learning)(q_tm1, batch.a_tm1, batch.r_t, discount, q_t)
        return np.asarray(errors)

    @property
    def step(self) -> int:
        return int(self.state.step)

    # -- persistence ------------------------------------------------------------------------------
    def bundle_bytes(self) -> bytes:
        """The published model: network config, shapes, online parameters and the vocabulary."""
        from dataclasses import asdict

        bundle = ModelBundle(
            format=1,
            network_config={
                **asdict(self.network_config),
                "hidden_sizes": list(self.network_config.hidden_sizes),
            },
            window=self.window,
            feature_dim=self.feature_dim,
            params=tree_to_bytes(self.state.params),
            vocabulary=self.vocabulary.to_bytes(),
        )
        return msgspec.msgpack.encode(bundle)

    def checkpoint_bytes(self) -> bytes:
        return tree_to_bytes(self.state)

    def restore(
        self, state_bytes: bytes, vocabulary_bytes: bytes, seen_ids: list[str], observed: int
    ) -> None:
        self.state = tree_from_bytes(self.state, state_bytes)
        self.vocabulary = Vocabulary.from_bytes(vocabulary_bytes)
        self.seen_ids = OrderedDict.fromkeys(seen_ids)
        self.observed = observed


def load_bundle(data: bytes) -> tuple[NetworkConfig, ModelBundle]:
    """Decode a published model bundle (raises ValueError when it is not one)."""
    try:
        bundle = msgspec.msgpack.decode(data, type=ModelBundle)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a qrec model bundle: {exc}") from None
    values = dict(bundle.network_config)
    values["hidden_sizes"] = tuple(values["hidden_sizes"])
    return NetworkConfig(**values), bundle
