"""The model an actor serves: parameters, vocabulary and a compiled scorer, swapped as a whole."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl.batch import ObsBatch, empty_obs_batch, event_type_indices
from rl.networks import QNetwork, init_params
from rl.serialize import tree_from_bytes
from rl.slate import user_slates
from rl.vocabulary import ItemGroups, Vocabulary
from schemas.messages import Observation
from services.actor.granularity import GroupCatalogue, servable_group_mask, window_action_ids
from services.learner.trainer import load_bundle
from services.model_topic import AssembledModel


def _as_keys(keys: jax.Array) -> jax.Array:
    """Typed PRNG keys (B,) from keys or from uint32 seeds (B,) (made inside the compiled call)."""
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.vmap(jax.random.key)(keys)


def _no_blocked(num_users: int) -> jax.Array:
    return jnp.full((num_users, 1), -1, jnp.int32)


@functools.partial(jax.jit, static_argnames=("network", "k", "exploration"))
def score_and_select(
    params: Any,
    obs: ObsBatch,
    allowed: jax.Array,
    keys: jax.Array,
    exploration_value: jax.Array,
    *,
    network: QNetwork,
    k: int,
    exploration: str,
    blocked: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Q-values for every action, then one slate per user: (actions, propensities, explored, scores).

    ``allowed`` is (A,) for the whole batch or (B, A); ``blocked`` (B, m) adds per-user exclusions
    (-1: unused slot); ``keys`` are PRNG keys or uint32 seeds, one per user.
    """
    q = network.apply(params, obs)  # (B, A)
    assert isinstance(q, jax.Array)
    blocked = _no_blocked(q.shape[0]) if blocked is None else blocked
    actions, propensities, explored = user_slates(
        q, allowed, blocked, _as_keys(keys), exploration_value, k=k, exploration=exploration
    )  # (B, k) each
    scores = jnp.take_along_axis(q, jnp.maximum(actions, 0), axis=1)  # (B, k)
    return actions, propensities, explored, scores


@functools.partial(jax.jit, static_argnames=("k", "exploration"))
def select_slates(
    scores: jax.Array,
    allowed: jax.Array,
    keys: jax.Array,
    value: jax.Array,
    *,
    k: int,
    exploration: str,
    blocked: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Slates over candidate scores (B, C) (popularity, random): (actions, propensities, explored).

    ``allowed`` is (C,) or (B, C), ``blocked`` (B, m) candidate indices, ``keys`` keys or uint32 seeds.
    """
    blocked = _no_blocked(scores.shape[0]) if blocked is None else blocked
    return user_slates(scores, allowed, blocked, _as_keys(keys), value, k=k, exploration=exploration)


@dataclass
class LiveModel:
    """A verified model version ready to score."""

    version: int
    created_at_ms: int
    network: QNetwork
    params: Any
    vocabulary: Vocabulary
    window: int
    feature_dim: int
    index: dict[str, int]  # raw action id (item, or category/brand) -> action index, for masks
    granularity: str = "item"
    groups: GroupCatalogue | None = None  # category/brand models: item -> group, items by popularity
    step: int = 0  # the learner's update count when it published this version

    @classmethod
    def from_assembled(cls, model: AssembledModel) -> LiveModel:
        """Decode and check a model; raises ValueError when the bytes are not a usable model."""
        network_config, bundle = load_bundle(model.data)
        network = QNetwork(network_config)
        example = empty_obs_batch(1, window=bundle.window, feature_dim=bundle.feature_dim)
        # Compiled: eager initialisation dispatches each small op separately and takes seconds.
        template = jax.jit(init_params, static_argnums=0)(network, example, jax.random.key(0))
        try:
            params = tree_from_bytes(template, bundle.params)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"model parameters do not fit the network: {exc}") from None
        vocabulary = Vocabulary.from_bytes(bundle.vocabulary)
        groups = None
        if bundle.granularity != "item":
            if bundle.granularity not in ("category", "brand") or not bundle.item_groups:
                raise ValueError(
                    f"model with {bundle.granularity!r} actions and no item groups cannot be served"
                )
            groups = GroupCatalogue.from_entries(ItemGroups.from_bytes(bundle.item_groups).entries())
        return cls(
            version=model.header.model_version,
            created_at_ms=model.header.created_at,
            network=network,
            params=params,
            vocabulary=vocabulary,
            window=bundle.window,
            feature_dim=bundle.feature_dim,
            index={
                item: i
                for i, item in enumerate(vocabulary.ids_for(range(vocabulary.num_actions)))
                if item is not None
            },
            granularity=bundle.granularity,
            groups=groups,
            step=model.header.step,
        )

    @functools.cached_property
    def allowed(self) -> np.ndarray:
        """(A,) the action slots that hold an item (padding and out-of-vocabulary slots never do); for a
        category/brand model, the groups that have at least one item to show."""
        allowed = self.vocabulary.allowed_mask()
        if self.groups is None:
            return allowed
        action_ids = self.vocabulary.ids_for(range(self.vocabulary.num_actions))
        return allowed & servable_group_mask(action_ids, self.groups, exclude=())

    def encode(self, observations: Sequence[Observation], pad_to: int) -> ObsBatch:
        """Arrays for ``observations``, padded with empty rows to ``pad_to`` (bounded recompiles)."""
        window, dim = self.window, self.feature_dim
        items = np.zeros((pad_to, window), np.int32)  # (B, W)
        types = np.zeros((pad_to, window), np.int32)  # (B, W)
        gaps = np.zeros((pad_to, window), np.float32)  # (B, W)
        features = np.zeros((pad_to, dim), np.float32)  # (B, D)
        for row, obs in enumerate(observations):
            if len(obs.features) != dim:
                raise ValueError(
                    f"state has {len(obs.features)} features, model {self.version} expects {dim}"
                )
            features[row] = obs.features
            recent = obs.recent_items[-window:]
            if recent:
                n = len(recent)
                if self.groups is not None:  # the model reads items as their groups; unknown ones as OOV
                    recent = [group or "" for group in window_action_ids(recent, self.groups)]
                items[row, window - n :] = self.vocabulary.lookup(recent)
                types[row, window - n :] = event_type_indices(obs.recent_event_types[-n:])
                gaps[row, window - n :] = np.log1p(np.asarray(obs.recent_gaps_seconds[-n:], np.float32))
        return ObsBatch(items=items, event_types=types, gaps=gaps, features=features)
