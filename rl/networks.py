"""The Q-network: a state encoder over the recent-interaction window and dense features, scored
against a shared item-embedding table, so Q(s, a) = f(s) · e_a + b_a for every action at once.

Sharing the item table between the state side (what the user just looked at) and the action side
(what we might recommend) means an item learns one representation from both roles; the dot-product
scorer also costs A·E per state instead of A·H for a dense output layer. The optional next-item head
is SQN's supervised head (Xin et al., SIGIR 2020): a softmax over the same items from the same state
encoding, with its own projection and bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl.batch import NUM_EVENT_TYPES, PAD_INDEX, ObsBatch, check_obs_batch
from rl.config_utils import config_from_dict, config_to_dict

# Parameters with one row per action: reset together when the vocabulary reuses an index.
ITEM_EMBEDDING_PATH = ("params", "item_embedding", "embedding")
ACTION_BIAS_PATH = ("params", "action_bias")
NEXT_ITEM_BIAS_PATH = ("params", "next_item_bias")
ACTION_ROW_PATHS = (ITEM_EMBEDDING_PATH, ACTION_BIAS_PATH, NEXT_ITEM_BIAS_PATH)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """Shape of the Q-network; the vocabulary's builder decides what an action is (item, category...)."""

    num_actions: int
    """Rows of the action table: vocabulary capacity + 2 (padding and out-of-vocabulary)."""
    embed_dim: int = 64
    """Width of item embeddings and of the state vector f(s) they are scored against."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the state MLP (ReLU)."""
    num_event_types: int = NUM_EVENT_TYPES
    """Rows of the event-type embedding: padding plus the seven event types."""
    dueling: bool = False
    """Score Q = V(s) + A(s, a) - mean_a A(s, a) instead of A(s, a) alone."""
    next_item_head: bool = False
    """Add SQN's supervised next-item softmax head over the same state encoding."""

    def __post_init__(self) -> None:
        if self.num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {self.num_actions}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not isinstance(self.hidden_sizes, tuple) or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be a tuple of positive ints, got {self.hidden_sizes!r}")
        if self.num_event_types < 1:
            raise ValueError(f"num_event_types must be >= 1, got {self.num_event_types}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NetworkConfig:
        """Build from a plain dict; unknown keys raise ValueError naming them."""
        return config_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def item_embedding_init(embed_dim: int) -> nn.initializers.Initializer:
    """Item rows start with unit expected norm, so initial scores f(s)·e_a are of order |f(s)|."""
    return nn.initializers.normal(stddev=embed_dim**-0.5)


class QNetwork(nn.Module):
    """Q-values for every action from an ObsBatch: (B, A); see the module docstring."""

    config: NetworkConfig

    def setup(self) -> None:
        config = self.config
        self.item_embedding = nn.Embed(
            config.num_actions, config.embed_dim, embedding_init=item_embedding_init(config.embed_dim)
        )
        self.action_bias = self.param("action_bias", nn.initializers.zeros, (config.num_actions,))
        self.event_type_embedding = nn.Embed(
            config.num_event_types, config.embed_dim, embedding_init=item_embedding_init(config.embed_dim)
        )
        self.gap_projection = nn.Dense(config.embed_dim)
        self.hidden_layers = [nn.Dense(size) for size in config.hidden_sizes]
        self.state_projection = nn.Dense(config.embed_dim)
        if config.dueling:
            self.value_head = nn.Dense(1)
        if config.next_item_head:
            self.next_item_projection = nn.Dense(config.embed_dim)
            self.next_item_bias = self.param("next_item_bias", nn.initializers.zeros, (config.num_actions,))

    def encode(self, obs: ObsBatch) -> jax.Array:
        """The shared state encoding: the last hidden layer, (B, H)."""
        check_obs_batch(obs)
        parts = []
        if obs.items.shape[1] > 0:
            # (B, W, E): what was touched, how, and how long ago, summed into one token per event.
            tokens = (
                self.item_embedding(obs.items)
                + self.event_type_embedding(obs.event_types)
                + self.gap_projection(obs.gaps[..., None].astype(jnp.float32))
            )
            # An event whose item is unknown still counts (OOV = 1); only padding is masked out.
            mask = ((obs.items != PAD_INDEX) | (obs.event_types != 0)).astype(jnp.float32)  # (B, W)
            count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
            pooled = (tokens * mask[..., None]).sum(axis=1) / count  # (B, E)
            # Mean pooling forgets order; the most recent event (last column, left padding) is the
            # strongest single signal for what comes next, so it also goes in on its own.
            last = tokens[:, -1, :] * mask[:, -1:]  # (B, E)
            parts += [pooled, last]
        parts.append(obs.features.astype(jnp.float32))
        hidden = jnp.concatenate(parts, axis=-1)  # (B, 2E + D) or (B, D) without a window
        for layer in self.hidden_layers:
            hidden = nn.relu(layer(hidden))
        return hidden

    def _advantage_parts(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """f(s) (B, E) and, for the dueling form, V(s) (B,)."""
        state = self.state_projection(hidden)  # (B, E)
        value = self.value_head(hidden)[:, 0] if self.config.dueling else None  # (B,)
        return state, value

    def _q_from_hidden(self, hidden: jax.Array) -> jax.Array:
        state, value = self._advantage_parts(hidden)
        advantage = self.item_embedding.attend(state) + self.action_bias  # (B, A)
        if value is None:
            return advantage
        return value[:, None] + advantage - advantage.mean(axis=1, keepdims=True)

    def __call__(self, obs: ObsBatch) -> jax.Array:
        """Q(s, a) for all actions: (B, A)."""
        q = self._q_from_hidden(self.encode(obs))
        assert q.shape == (obs.items.shape[0], self.config.num_actions), q.shape
        return q

    def q_for_actions(self, obs: ObsBatch, actions: jax.Array) -> jax.Array:
        """Q(s, a) for one given action per state: (B,), at O(B·E) instead of O(B·E·A).

        The TD loss only needs the taken action's value; gathering its row instead of scoring all A
        actions is what keeps the learner's backward pass independent of the catalogue size.
        """
        assert actions.shape == (obs.items.shape[0],), (actions.shape, obs.items.shape)
        return self._q_taken_from_hidden(self.encode(obs), actions)

    def _q_taken_from_hidden(self, hidden: jax.Array, actions: jax.Array) -> jax.Array:
        state, value = self._advantage_parts(hidden)
        table = self.item_embedding.embedding  # (A, E)
        q = jnp.einsum("be,be->b", state, table[actions]) + self.action_bias[actions]  # (B,)
        if value is None:
            return q
        # mean_a (f·e_a + b_a) = f · mean_a e_a + mean_a b_a, still without a (B, A) matrix.
        mean_advantage = state @ table.mean(axis=0) + self.action_bias.mean()  # (B,)
        return value + q - mean_advantage

    def next_item_logits(self, obs: ObsBatch) -> jax.Array:
        """SQN head: logits over the next item, (B, A). Requires next_item_head=True."""
        if not self.config.next_item_head:
            raise ValueError("next_item_logits needs NetworkConfig(next_item_head=True)")
        return self._next_item_from_hidden(self.encode(obs))

    def _next_item_from_hidden(self, hidden: jax.Array) -> jax.Array:
        projected = self.next_item_projection(hidden)  # (B, E)
        return self.item_embedding.attend(projected) + self.next_item_bias  # (B, A)

    def q_for_actions_and_next_item_logits(
        self, obs: ObsBatch, actions: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Both SQN outputs from one encoder pass: Q(s, a) for the given actions (B,), logits (B, A)."""
        assert actions.shape == (obs.items.shape[0],), (actions.shape, obs.items.shape)
        hidden = self.encode(obs)
        return self._q_taken_from_hidden(hidden, actions), self._next_item_from_hidden(hidden)

    def state_and_value(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array | None]:
        """f(s) (B, E) and, for the dueling form, V(s) (B,): what scoring the actions starts from."""
        return self._advantage_parts(self.encode(obs))

    def initialize_all(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array | None]:
        """Touch every submodule so `init` creates all parameters; returns (q, logits or None)."""
        hidden = self.encode(obs)
        q = self._q_from_hidden(hidden)
        logits = self._next_item_from_hidden(hidden) if self.config.next_item_head else None
        return q, logits


def init_params(network: QNetwork, example_obs: ObsBatch, key: jax.Array) -> Any:
    """Fresh parameters for `network`, shaped by `example_obs` (its batch size does not matter).

    The window width and feature count of `example_obs` are fixed into the parameters. Outside a
    trace, prefer `init_params_compiled`, which is much faster to run the first time.
    """
    return network.init(key, example_obs, method=QNetwork.initialize_all)


# Initialisation runs once, so its machine code need not be fast, only quick to build: eager
# execution dispatches every small op one by one (~6 s for a tiny network on a 2-core CPU), and a
# default compile spends ~2 s optimising random-number code; backend optimisation level 0 cuts that
# ~2.5x. Compiled functions are cached per network and input shape. JAX allows compiler options on
# top-level jits only, so call this outside jit / eval_shape (init_params works anywhere).
init_params_compiled = jax.jit(
    init_params, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0}
)


def q_values(network: QNetwork, params: Any, obs: ObsBatch) -> jax.Array:
    """Q(s, a) for all actions, (B, A): `network.apply` with the return type spelled out."""
    return cast(jax.Array, network.apply(params, obs))
