"""The learner's core, shared by the streaming service and offline training: transitions in, updates out.

It owns the vocabulary (raw action id -> action index), the replay buffer and the train state, and turns
Transition messages into arrays. It does no I/O; the service feeds it and publishes what it makes.

Action granularity: with "item" an action is the item acted on (``a_tm1``); with "category" or "brand"
it is that item's category or brand (``a_tm1_category`` / ``a_tm1_brand``), the vocabulary holds
category (brand) ids, and the Q-head scores categories (brands). The user's recent items are then read
as their categories (brands) too, through an `ItemGroups` map learned from the same transitions, so
state and action share one embedding table. Transitions that lack the needed field are skipped and
counted in `Trainer.unusable`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import msgspec
import numpy as np

from rl.batch import OOV_INDEX, ObsBatch, TransitionBatch, empty_obs_batch, event_type_indices
from rl.networks import NetworkConfig, QNetwork, q_values
from rl.replay import ReplayBuffer
from rl.serialize import ENCODING, tree_from_bytes, tree_to_bytes
from rl.train import LearnerConfig, TrainState, create_train_state, reset_action_rows, update_many_in_place
from rl.value_learning import double_q_learning, q_learning
from rl.vocabulary import ItemGroups, Vocabulary
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
    granularity: str = "item"
    """What an action index stands for: "item", "category" or "brand"."""
    item_groups: bytes = b""
    """For category/brand models: `ItemGroups.to_bytes` (item -> group and popularity); else empty."""


def network_config_for(settings: ModelSettings) -> NetworkConfig:
    return NetworkConfig(
        num_actions=settings.vocabulary_capacity + 2,
        embed_dim=settings.embed_dim,
        hidden_sizes=settings.hidden(),
        dueling=settings.dueling,
        next_item_head=settings.sqn_weight > 0,
        repeat_head=settings.repeat_head,
        q_item_table=settings.q_item_table,
        factored_q=settings.factored_q,
    )


def learner_config_for(settings: ModelSettings) -> LearnerConfig:
    return LearnerConfig(
        gamma=settings.gamma,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        double_dqn=settings.double_dqn,
        bootstrap=settings.td_bootstrap,  # type: ignore[arg-type]
        target_update=settings.target_update,  # type: ignore[arg-type]
        target_update_period=settings.target_update_period,
        polyak_tau=settings.polyak_tau,
        sqn_weight=settings.sqn_weight,
        next_item_negatives=settings.next_item_negatives,
        split_losses=settings.split_losses,
        item_updates=settings.item_updates,  # type: ignore[arg-type]
        seed=settings.seed,
    )


# The Transition field that names the action at each granularity.
ACTION_FIELDS = {"item": "a_tm1", "category": "a_tm1_category", "brand": "a_tm1_brand"}


def action_id(transition: Transition, granularity: str) -> str | None:
    """The raw action id of a transition at a granularity (None when the transition lacks it)."""
    value: str | None = getattr(transition, ACTION_FIELDS[granularity])
    return value


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

    def __init__(
        self,
        settings: ModelSettings,
        feature_dim: int,
        *,
        network_changes: Mapping[str, Any] | None = None,
        learner_changes: Mapping[str, Any] | None = None,
    ) -> None:
        """``network_changes`` / ``learner_changes``: fields of NetworkConfig / LearnerConfig that the
        learner's settings do not expose (offline evaluation uses them), set before the train state
        is built, since they shape its parameters and optimizer state."""
        self.settings = settings
        self.feature_dim = feature_dim
        self.window = settings.window
        self.network_config = dataclasses.replace(network_config_for(settings), **(network_changes or {}))
        self.learner_config = dataclasses.replace(learner_config_for(settings), **(learner_changes or {}))
        self.network = QNetwork(self.network_config)
        self.vocabulary = Vocabulary(settings.vocabulary_capacity, settings.vocabulary_min_count)
        self.granularity = settings.action_granularity
        if self.granularity not in ACTION_FIELDS:
            raise ValueError(
                f"action_granularity must be one of {', '.join(ACTION_FIELDS)}, got {self.granularity!r}"
            )
        self.item_groups = ItemGroups(settings.item_groups_capacity)
        # Fresh transitions skipped because they lack their action at this granularity (cumulative).
        self.unusable = 0
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
        lookup = self.vocabulary.lookup if self.granularity == "item" else self._group_lookup
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

    def _group_lookup(self, item_ids: Sequence[str]) -> np.ndarray:
        """Action indices of the items' groups, (n,) int32; an item of unknown group is OOV."""
        groups = self.item_groups.groups_for(item_ids)
        indices = self.vocabulary.lookup([group or "" for group in groups])  # (n,)
        return np.where([group is None for group in groups], OOV_INDEX, indices).astype(np.int32)

    def window_ids(self, recent_items: Sequence[str]) -> list[str]:
        """The raw action ids a window of recent items reads as (unknown groups left out)."""
        if self.granularity == "item":
            return list(recent_items)
        return [group for group in self.item_groups.groups_for(recent_items) if group is not None]

    def add(self, transitions: Sequence[Transition]) -> int:
        """Drop already-seen transition ids, grow the vocabulary, fill the buffer; returns the new count.

        The count is of transitions put into the buffer: new ids without their action at this
        granularity are skipped (`unusable`), so duplicates = len(transitions) - added - skipped.
        """
        fresh = []
        for transition in transitions:
            if transition.transition_id in self.seen_ids:
                continue
            self.seen_ids[transition.transition_id] = None
            fresh.append(transition)
        while len(self.seen_ids) > getattr(self.settings, "dedupe_ids", 200_000):
            self.seen_ids.popitem(last=False)
        if self.granularity != "item":
            usable = [t for t in fresh if action_id(t, self.granularity) is not None]
            self.unusable += len(fresh) - len(usable)
            fresh = usable
            # Before any window is read: an item acted on in this batch may sit in a later window.
            self.item_groups.observe((t.a_tm1, cast(str, action_id(t, self.granularity))) for t in fresh)
        if not fresh:
            return 0
        self.observed += len(fresh)
        ids: list[str] = []
        for transition in fresh:
            ids.append(cast(str, action_id(transition, self.granularity)))
            ids.extend(self.window_ids(transition.obs_tm1.recent_items[-self.window :]))
        reused = self.vocabulary.observe(ids, self.observed)
        if reused:
            self._key, key = jax.random.split(self._key)
            self.state = reset_action_rows(self.state, reused, key)
        self.buffer.add(self.to_batch(fresh))
        return len(fresh)

    def to_batch(self, transitions: Sequence[Transition]) -> TransitionBatch:
        """Arrays for a list of transitions (vocabulary lookups, padding, log gaps, clipped rewards)."""
        obs_tm1 = self._obs_arrays([t.obs_tm1 for t in transitions])
        obs_t = self._obs_arrays([t.obs_t for t in transitions])
        r_t = np.asarray([t.r_t for t in transitions], np.float32)  # (N,)
        if self.settings.reward_clip > 0:
            r_t = np.clip(r_t, -self.settings.reward_clip, self.settings.reward_clip)
        return TransitionBatch(
            obs_tm1=obs_tm1,
            a_tm1=self.vocabulary.lookup([action_id(t, self.granularity) or "" for t in transitions]),
            r_t=r_t,
            discount_t=np.asarray([0.0 if t.done else 1.0 for t in transitions], np.float32),
            obs_t=obs_t,
            weights=np.ones((len(transitions),), np.float32),
            logged=np.asarray([t.source == "logged" for t in transitions], np.float32),
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
            # In place: the old state's buffers become the new state's (hold no arrays of it across).
            self.state, metrics = update_many_in_place(
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
        """TD errors of a batch under the current online and target parameters (no update), (B,)."""
        size = int(np.shape(batch.a_tm1)[0])
        if size == 0:
            return np.zeros((0,), np.float32)
        # Padded to a power of two, so evaluations of varying sizes reuse a few compiled shapes.
        padded = max(8, 1 << max(0, size - 1).bit_length())

        def pad(leaf: Any) -> np.ndarray:
            array = np.asarray(leaf)
            return np.pad(array, [(0, padded - size)] + [(0, 0)] * (array.ndim - 1), mode="edge")

        errors = td_errors(
            self.state.params,
            self.state.target_params,
            jax.tree.map(pad, batch),
            network=self.network,
            gamma=self.learner_config.gamma,
            double_dqn=self.learner_config.double_dqn,
        )
        return np.asarray(errors)[:size]

    @property
    def step(self) -> int:
        return int(self.state.step)

    # -- persistence ------------------------------------------------------------------------------
    def bundle_bytes(self) -> bytes:
        """The published model: network config, shapes, online parameters and the vocabulary.

        The parameters are the online ones with the Q-head blended with the next-item head as the
        settings' serve weights say (unchanged by default); checkpoints keep the heads apart. With the
        repeat head and serve_q_weight 0, the parameters are unchanged and the published network
        config says ``scores="next_item"``: readers score by the next-item head, repeat scores included.
        With serve_log_q_weight > 0 the parameters are unchanged and it says
        ``scores="next_item_and_log_q"`` with the serve weights: readers add log Q to the logits.
        """
        network_config = self.network_config
        params = self.state.params
        if self.settings.serve_log_q_weight > 0:
            # Both heads stay apart in the parameters; the network config says how to combine them.
            network_config = dataclasses.replace(
                network_config,
                scores="next_item_and_log_q",
                score_next_item_weight=self.settings.serve_next_item_weight,
                score_log_q_weight=self.settings.serve_log_q_weight,
                score_q_floor=self.settings.serve_q_floor,
            )
        elif self.network_config.repeat_head and self.settings.serve_q_weight == 0.0:
            # The repeat head replaces the next-item logits of the window's items but adds to their
            # Q, so no Q-shaped head scores the next-item head: the model says to score by it.
            network_config = dataclasses.replace(network_config, scores="next_item")
        else:
            params = serving_params(
                params,
                q_weight=self.settings.serve_q_weight,
                next_item_weight=self.settings.serve_next_item_weight,
            )
        bundle = ModelBundle(
            format=1,
            network_config={
                **dataclasses.asdict(network_config),
                "hidden_sizes": list(network_config.hidden_sizes),
            },
            window=self.window,
            feature_dim=self.feature_dim,
            params=tree_to_bytes(params),
            vocabulary=self.vocabulary.to_bytes(),
            granularity=self.granularity,
            item_groups=b"" if self.granularity == "item" else self.item_groups.to_bytes(),
        )
        return msgspec.msgpack.encode(bundle)

    def checkpoint_bytes(self) -> bytes:
        return tree_to_bytes(self.state)

    def restore(
        self,
        state_bytes: bytes,
        vocabulary_bytes: bytes,
        seen_ids: list[str],
        observed: int,
        item_groups_bytes: bytes | None = None,
    ) -> None:
        self.state = tree_from_bytes(self.state, state_bytes)
        self.vocabulary = Vocabulary.from_bytes(vocabulary_bytes)
        self.seen_ids = OrderedDict.fromkeys(seen_ids)
        self.observed = observed
        if item_groups_bytes:
            self.item_groups = ItemGroups.from_bytes(item_groups_bytes)


@functools.partial(jax.jit, static_argnames=("network", "gamma", "double_dqn"))
def td_errors(
    params: Any,
    target_params: Any,
    batch: TransitionBatch,
    *,
    network: QNetwork,
    gamma: float,
    double_dqn: bool,
) -> jax.Array:
    """TD errors (B,) of a batch: targets from `target_params` (action chosen by `params` if double)."""
    q_tm1 = q_values(network, params, batch.obs_tm1)  # (B, A)
    q_t = q_values(network, target_params, batch.obs_t)  # (B, A)
    discount = gamma * batch.discount_t  # (B,)
    if double_dqn:
        selector = q_values(network, params, batch.obs_t)  # (B, A)
        return jax.vmap(double_q_learning)(q_tm1, batch.a_tm1, batch.r_t, discount, q_t, selector)
    return jax.vmap(q_learning)(q_tm1, batch.a_tm1, batch.r_t, discount, q_t)


def serving_params(params: Any, *, q_weight: float, next_item_weight: float) -> Any:
    """Parameters whose Q-head scores ``q_weight * Q(s, a) + next_item_weight * next-item logit``.

    Both heads score a state projection against the same item table plus a per-item bias
    (``f(s) . e_a + b_a``), so a weighted sum of the two is itself such a head: the published model
    keeps the network's shape and any reader ranks by the blend. A per-state constant (the
    log-softmax normaliser, the dueling value) never changes a user's ranking. With
    ``next_item_weight`` 0 and ``q_weight`` 1 the parameters come back unchanged.
    """
    if next_item_weight == 0.0 and q_weight == 1.0:
        return params
    inner = params["params"]
    if "next_item_projection" not in inner:
        raise ValueError("blending in the next-item head needs a model trained with sqn_weight > 0")
    if "q_item_embedding" in inner:
        raise ValueError("blending in the next-item head is not possible when Q has its own item table")
    if "continuation_bias" in inner:
        raise ValueError("blending in the next-item head is not possible with the factored Q")
    if "repeat_out" in inner:
        # The repeat head replaces the next-item logits of the window's items but adds to their Q:
        # no single head of the Q form scores that blend.
        raise ValueError("blending in the next-item head is not possible with the repeat head")
    q_head, next_head = inner["state_projection"], inner["next_item_projection"]
    blended = {
        **inner,
        "state_projection": {
            name: q_weight * np.asarray(q_head[name]) + next_item_weight * np.asarray(next_head[name])
            for name in q_head
        },
        "action_bias": q_weight * np.asarray(inner["action_bias"])
        + next_item_weight * np.asarray(inner["next_item_bias"]),
    }
    return {**params, "params": blended}


def load_bundle(data: bytes) -> tuple[NetworkConfig, ModelBundle]:
    """Decode a published model bundle (raises ValueError when it is not one)."""
    try:
        bundle = msgspec.msgpack.decode(data, type=ModelBundle)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a qrec model bundle: {exc}") from None
    values = dict(bundle.network_config)
    values["hidden_sizes"] = tuple(values["hidden_sizes"])
    return NetworkConfig(**values), bundle
