"""The Q-network: a state encoder over the recent-interaction window and dense features, scored
against a shared item-embedding table, so Q(s, a) = f(s) · e_a + b_a for every action at once.

Sharing the item table between the state side (what the user just looked at) and the action side
(what we might recommend) means an item learns one representation from both roles; the dot-product
scorer also costs A·E per state instead of A·H for a dense output layer. The optional next-item head
is SQN's supervised head (Xin et al., SIGIR 2020): a softmax over the same items from the same state
encoding, with its own projection and bias.

The optional repeat head is a copy mechanism in the spirit of RepeatNet (Ren et al., AAAI 2019):
shoppers return to what they just looked at (on the Taobao log half of all purchases are of an item
among the buyer's last ten interactions), which a dot product with item embeddings cannot express
for an item whose embedding never trained. So every window slot also gets a learned score from its
event type, age, copies in the window and the state. For Q it is added to the item's score (a bonus
on top of what the item embedding knows); for the next-item logits it replaces the item's logit, as
RepeatNet's repeat mode scores window items apart from its explore mode, which scores the rest.
With `repeat_mode="mixture"` the next-item head is RepeatNet's whole model: a learned P(repeat | s)
weighs a softmax over the window against a softmax over every other item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl.batch import FIRST_ITEM_INDEX, NUM_EVENT_TYPES, PAD_INDEX, ObsBatch, check_obs_batch
from rl.config_utils import config_from_dict, config_to_dict

# Parameters with one row per action: reset together when the vocabulary reuses an index.
ITEM_EMBEDDING_PATH = ("params", "item_embedding", "embedding")
ACTION_BIAS_PATH = ("params", "action_bias")
NEXT_ITEM_BIAS_PATH = ("params", "next_item_bias")
Q_ITEM_EMBEDDING_PATH = ("params", "q_item_embedding", "embedding")
CONTINUATION_BIAS_PATH = ("params", "continuation_bias")
FUTURE_BIAS_PATH = ("params", "future_bias")
# A score left out of a sampled softmax's sum (a sampled item that is the state's own next item or in
# its window): finite, so the log-sum-exp stays exact and its gradient there is 0.
MASKED_LOGIT = -1e9
ACTION_ROW_PATHS = (
    ITEM_EMBEDDING_PATH,
    ACTION_BIAS_PATH,
    NEXT_ITEM_BIAS_PATH,
    Q_ITEM_EMBEDDING_PATH,
    CONTINUATION_BIAS_PATH,
    FUTURE_BIAS_PATH,
)
REPEAT_MODES = ("replace", "mixture")
SCORES = ("q", "next_item", "next_item_and_log_q")


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
    repeat_head: bool = False
    """Add a learned score to each item in the recent window (a copy mechanism; see the module)."""
    q_item_table: bool = False
    """Score Q against an item table of its own (zeros at the start) instead of the one the window and
    the next-item head share: Q(s, a) = f(s) . u_a + b_a. With the next-item head the shared table is
    shaped by the shoppers' choices, and Q read through it varies from item to item by what those
    choices taught, not by what Q learned; its own table moves only for the items Q learns about."""
    factored_q: bool = False
    """Factor Q by what follows the action: Q(s, a) = R(s, a) + c(s, a) * G(s, a), with R = r(s) +
    b_a (+ the repeat head's score) the immediate reward, c = sigmoid(h(s) + d_a) the chance the
    session goes on after it and G = g(s) + k_a the discounted value of going on. Each part is a
    state term plus one number per item, with no item-by-state product: Q learned from few
    transitions (clicked slots) says per item what the item is worth and what it does to the
    session, and the next-item head, ranked beside it, says which items this shopper would pick.
    The learner fits each part to its own signal (the reward, the 0/1 continuation, the bootstrap
    of the transitions that went on), so a cost an item carries in what follows it (a click that
    ends the session) is learned from every transition of that item, without the Bernoulli noise
    of the session's end in one regression onto r + gamma (1 - done) V(s'). Q reads no item table."""
    repeat_hidden: int = 32
    """Hidden width of the repeat head's per-slot scorer."""
    repeat_mode: str = "replace"
    """How the repeat head enters the next-item logits: 'replace' (a window item's logit is its repeat
    score) or 'mixture' (RepeatNet's two modes: P(repeat | s) times a softmax over the window, plus
    P(explore | s) times a softmax over the other items)."""
    scores: str = "q"
    """What calling the network returns for every action: 'q' (Q(s, a)), 'next_item' (the next-item
    head's logits, repeat scores included: a published model that ranks by the supervised head) or
    'next_item_and_log_q' (``score_next_item_weight * logit(s, a) + score_log_q_weight *
    log(max(Q(s, a), score_q_floor))``: with Q the value of an item given it is chosen, as learned from
    clicked slots, and the logit the log-chance the shopper chooses it, up to a per-state constant,
    weights 1 and 1 rank by the log of chance times value, SlateQ's expected value of showing it)."""
    score_next_item_weight: float = 1.0
    """With scores='next_item_and_log_q': weight of the next-item logit."""
    score_log_q_weight: float = 1.0
    """With scores='next_item_and_log_q': weight of log Q."""
    score_q_floor: float = 0.01
    """With scores='next_item_and_log_q': Q below this (an item worth nothing or less) counts as it."""

    def __post_init__(self) -> None:
        if self.num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {self.num_actions}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not isinstance(self.hidden_sizes, tuple) or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be a tuple of positive ints, got {self.hidden_sizes!r}")
        if self.num_event_types < 1:
            raise ValueError(f"num_event_types must be >= 1, got {self.num_event_types}")
        if self.repeat_hidden < 1:
            raise ValueError(f"repeat_hidden must be >= 1, got {self.repeat_hidden}")
        if self.repeat_mode not in REPEAT_MODES:
            raise ValueError(f"repeat_mode must be one of {REPEAT_MODES}, got {self.repeat_mode!r}")
        if self.scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {self.scores!r}")
        if self.scores in ("next_item", "next_item_and_log_q") and not self.next_item_head:
            raise ValueError(f"scores={self.scores!r} needs next_item_head=True")
        if not self.score_q_floor > 0:
            raise ValueError(f"score_q_floor must be > 0, got {self.score_q_floor}")
        if self.factored_q and (self.dueling or self.q_item_table):
            raise ValueError(
                "factored_q is a form of Q of its own, with no item table: not with dueling or q_item_table"
            )

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
        if config.q_item_table:
            self.q_item_embedding = nn.Embed(
                config.num_actions, config.embed_dim, embedding_init=nn.initializers.zeros
            )
        if config.factored_q:
            self.reward_state = nn.Dense(1)  # r(s): what a step is worth here, before the item's bias
            self.continuation_state = nn.Dense(1)  # h(s): log-odds that the session goes on
            self.continuation_bias = self.param(
                "continuation_bias", nn.initializers.zeros, (config.num_actions,)
            )
            self.continuation_value = nn.Dense(1)  # g(s): what going on is worth
            self.future_bias = self.param("future_bias", nn.initializers.zeros, (config.num_actions,))
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
        if config.repeat_head:
            self.repeat_slot = nn.Dense(config.repeat_hidden)
            self.repeat_state = nn.Dense(config.repeat_hidden, use_bias=False)
            # Two scores per slot: one added to Q, one to the next-item logits. Zero at the start,
            # so a fresh network scores exactly as it would without the head.
            self.repeat_out = nn.Dense(2, kernel_init=nn.initializers.zeros)
            if config.next_item_head and config.repeat_mode == "mixture":
                self.repeat_mode_logit = nn.Dense(1)  # log-odds of P(repeat | s) over P(explore | s)

    def _encode(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array | None]:
        """The state encoding (B, H) and what the window's events were (type, gap) apart from their
        items, (B, W, E); None without a window."""
        check_obs_batch(obs)
        parts = []
        context = None
        if obs.items.shape[1] > 0:
            # (B, W, E): what was touched, how, and how long ago, summed into one token per event.
            context = self.event_type_embedding(obs.event_types) + self.gap_projection(
                obs.gaps[..., None].astype(jnp.float32)
            )  # (B, W, E): how and when, without which item
            tokens = self.item_embedding(obs.items) + context
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
        return hidden, context

    def encode(self, obs: ObsBatch) -> jax.Array:
        """The shared state encoding: the last hidden layer, (B, H)."""
        return self._encode(obs)[0]

    def _repeat_scores(self, obs: ObsBatch, hidden: jax.Array, context: jax.Array | None) -> jax.Array | None:
        """(B, W, 2) scores for the window's items (Q, next-item); 0 on slots without a known item.

        A slot is scored from how and when its item was touched, how often the window holds that
        item, and the state; not from the item's own embedding, so an item the model has barely
        trained on gets as sound a repeat score as a familiar one.
        """
        if not self.config.repeat_head or context is None:
            return None
        window = obs.items.shape[1]
        # Age in events, newest 0: the same item means more when it was the last thing touched.
        age = jnp.log1p(jnp.arange(window - 1, -1, -1, dtype=jnp.float32))  # (W,)
        age = jnp.broadcast_to(age[None, :, None], (*obs.items.shape, 1))  # (B, W, 1)
        same = (obs.items[:, :, None] == obs.items[:, None, :]).sum(axis=2)  # (B, W): copies in the window
        copies = jnp.log(same.astype(jnp.float32))[..., None]  # (B, W, 1)
        slot = self.repeat_slot(jnp.concatenate([context, age, copies], axis=-1))  # (B, W, R)
        scores = self.repeat_out(nn.relu(slot + self.repeat_state(hidden)[:, None, :]))  # (B, W, 2)
        known = (obs.items >= FIRST_ITEM_INDEX)[..., None]  # (B, W, 1): padding and OOV get nothing
        return jnp.where(known, scores, 0.0)

    def _advantage_parts(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """f(s) (B, E) and, for the dueling form, V(s) (B,)."""
        state = self.state_projection(hidden)  # (B, E)
        value = self.value_head(hidden)[:, 0] if self.config.dueling else None  # (B,)
        return state, value

    def _q_table(self) -> nn.Embed:
        """The item table Q is scored against: its own with q_item_table, else the shared one."""
        return self.q_item_embedding if self.config.q_item_table else self.item_embedding

    def _continuation_parts(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """h(s) (B,) and g(s) (B,) of the factored form."""
        return self.continuation_state(hidden)[:, 0], self.continuation_value(hidden)[:, 0]

    def _q_from_hidden(self, obs: ObsBatch, hidden: jax.Array, context: jax.Array | None) -> jax.Array:
        if self.config.factored_q:
            reward = self.reward_state(hidden) + self.action_bias  # (B, A)
            repeat = self._repeat_scores(obs, hidden, context)
            if repeat is not None:
                reward = add_to_items(reward, obs.items, repeat[..., 0])
            going_on, future = self._continuation_parts(hidden)  # (B,), (B,)
            chance = nn.sigmoid(going_on[:, None] + self.continuation_bias)  # (B, A)
            return reward + chance * (future[:, None] + self.future_bias)
        state, value = self._advantage_parts(hidden)
        advantage = self._q_table().attend(state) + self.action_bias  # (B, A)
        repeat = self._repeat_scores(obs, hidden, context)
        if repeat is not None:
            advantage = add_to_items(advantage, obs.items, repeat[..., 0])
        if value is None:
            return advantage
        return value[:, None] + advantage - advantage.mean(axis=1, keepdims=True)

    def __call__(self, obs: ObsBatch) -> jax.Array:
        """Q(s, a) for all actions, (B, A); the next-item logits instead with scores='next_item', and
        their blend with log Q with scores='next_item_and_log_q'."""
        hidden, context = self._encode(obs)
        if self.config.scores == "next_item":
            return self._next_item_from_hidden(obs, hidden, context)
        q = self._q_from_hidden(obs, hidden, context)
        if self.config.scores == "next_item_and_log_q":
            logits = self._next_item_from_hidden(obs, hidden, context)
            log_q = jnp.log(jnp.maximum(q, self.config.score_q_floor))  # (B, A)
            return self.config.score_next_item_weight * logits + self.config.score_log_q_weight * log_q
        assert q.shape == (obs.items.shape[0], self.config.num_actions), q.shape
        return q

    def q_for_actions(self, obs: ObsBatch, actions: jax.Array) -> jax.Array:
        """Q(s, a) for one given action per state: (B,), at O(B·E) instead of O(B·E·A).

        The TD loss only needs the taken action's value; gathering its row instead of scoring all A
        actions is what keeps the learner's backward pass independent of the catalogue size.
        """
        assert actions.shape == (obs.items.shape[0],), (actions.shape, obs.items.shape)
        hidden, context = self._encode(obs)
        return self._q_taken_from_hidden(obs, hidden, context, actions)

    def _q_taken_from_hidden(
        self, obs: ObsBatch, hidden: jax.Array, context: jax.Array | None, actions: jax.Array
    ) -> jax.Array:
        return self._q_taken(hidden, obs.items, self._repeat_scores(obs, hidden, context), actions)

    def _q_taken(
        self, hidden: jax.Array, items: jax.Array, repeat: jax.Array | None, actions: jax.Array
    ) -> jax.Array:
        """Q(s, a) (B,) for one action per state, given the window's items and repeat scores."""
        if self.config.factored_q:
            reward, going_on, future = self._factored_taken(hidden, items, repeat, actions)
            return reward + nn.sigmoid(going_on) * future
        state, value = self._advantage_parts(hidden)
        table = self._q_table().embedding  # (A, E)
        q = jnp.einsum("be,be->b", state, table[actions]) + self.action_bias[actions]  # (B,)
        if repeat is not None:
            q = q + repeat_for_actions(items, repeat[..., 0], actions)
        if value is None:
            return q
        # mean_a (f·e_a + b_a) = f · mean_a e_a + mean_a b_a, still without a (B, A) matrix; the
        # repeat scores add their sum / A.
        mean_advantage = state @ table.mean(axis=0) + self.action_bias.mean()  # (B,)
        if repeat is not None:
            mean_advantage = mean_advantage + repeat[..., 0].sum(axis=1) / self.config.num_actions
        return value + q - mean_advantage

    def next_item_logits(self, obs: ObsBatch) -> jax.Array:
        """SQN head: logits over the next item, (B, A). Requires next_item_head=True."""
        if not self.config.next_item_head:
            raise ValueError("next_item_logits needs NetworkConfig(next_item_head=True)")
        hidden, context = self._encode(obs)
        return self._next_item_from_hidden(obs, hidden, context)

    def _next_item_from_hidden(
        self, obs: ObsBatch, hidden: jax.Array, context: jax.Array | None
    ) -> jax.Array:
        projected = self.next_item_projection(hidden)  # (B, E)
        logits = self.item_embedding.attend(projected) + self.next_item_bias  # (B, A)
        repeat = self._repeat_scores(obs, hidden, context)
        if repeat is None:
            return logits
        if self.config.repeat_mode == "mixture":
            mode = self.repeat_mode_logit(hidden)[:, 0]  # (B,)
            return repeat_explore_log_probs(logits, obs.items, repeat[..., 1], mode)
        # RepeatNet's split: a window item's chance of coming next is judged by the repeat head
        # alone, so the item-embedding noise of barely trained items cannot reorder the window.
        return replace_at_items(logits, obs.items, repeat[..., 1])

    def _sampled_next_item_log_probs(
        self,
        obs: ObsBatch,
        hidden: jax.Array,
        context: jax.Array | None,
        actions: jax.Array,
        negatives: jax.Array,
    ) -> jax.Array:
        """log P(a | s) (B,) of each state's own next item `actions`, as `_next_item_from_hidden` gives
        it, with the sum over the catalogue in its normaliser taken over N sampled items `negatives`
        (N,) shared by the batch instead: a sampled softmax. A sampled item equal to the state's own
        next item is left out of that state's sum. With the repeat head, the window's items are
        scored exactly (they are few, and the strongest competitors) and only the items outside the
        window are sampled. With every action as `negatives` once, it equals the full log-softmax."""
        projected = self.next_item_projection(hidden)  # (B, E)
        table, bias = self.item_embedding.embedding, self.next_item_bias  # (A, E), (A,)
        explore_taken = jnp.einsum("be,be->b", projected, table[actions]) + bias[actions]  # (B,)
        explore_sampled = projected @ table[negatives].T + bias[negatives]  # (B, N)
        counted = negatives[None, :] != actions[:, None]  # (B, N)
        repeat = self._repeat_scores(obs, hidden, context)
        if repeat is None:
            sampled = jnp.where(counted, explore_sampled, MASKED_LOGIT)
            return explore_taken - jax.nn.logsumexp(jnp.concatenate([explore_taken[:, None], sampled], 1), 1)
        items = obs.items  # (B, W)
        known = items >= FIRST_ITEM_INDEX  # (B, W)
        taken_slots = known & (items == actions[:, None])  # (B, W)
        taken_in_window = taken_slots.any(axis=1)  # (B,)
        # The window's items are scored exactly below: a sampled one is not counted again.
        counted &= ~((negatives[None, :, None] == items[:, None, :]) & known[:, None, :]).any(axis=2)
        sampled = jnp.where(counted, explore_sampled, MASKED_LOGIT)  # (B, N)
        slot_scores = repeat[..., 1]  # (B, W)
        if self.config.repeat_mode == "mixture":
            # P(repeat) times the softmax over the window's slots for a window item; P(explore) times
            # the softmax over the items outside the window (here: sampled) for the rest.
            mode = self.repeat_mode_logit(hidden)[:, 0]  # (B,)
            any_known = known.any(axis=1)  # (B,)
            slot_log_probs = window_slot_log_probs(items, slot_scores)  # (B, W)
            log_window = jax.nn.logsumexp(jnp.where(taken_slots, slot_log_probs, MASKED_LOGIT), axis=1)
            log_repeat = jax.nn.log_sigmoid(mode) + log_window  # (B,)
            log_explore = jnp.where(any_known, jax.nn.log_sigmoid(-mode), 0.0)  # (B,)
            explore = explore_taken - jax.nn.logsumexp(
                jnp.concatenate([explore_taken[:, None], sampled], 1), 1
            )
            return jnp.where(taken_in_window, log_repeat, log_explore + explore)
        # 'replace': a window item is scored by its repeat score (the highest of its slots), once.
        first, item_scores = window_item_scores(items, slot_scores)  # (B, W) each
        window = jnp.where(first, item_scores, MASKED_LOGIT)  # (B, W)
        taken_repeat = jnp.max(jnp.where(taken_slots, slot_scores, -jnp.inf), axis=1)  # (B,)
        taken = jnp.where(taken_in_window, taken_repeat, explore_taken)  # (B,)
        # The taken item is in the window's part when it is a window item, else in a column of its own.
        outside = jnp.where(taken_in_window, MASKED_LOGIT, explore_taken)  # (B,)
        return taken - jax.nn.logsumexp(jnp.concatenate([outside[:, None], window, sampled], 1), 1)

    def q_for_actions_and_next_item_logits(
        self, obs: ObsBatch, actions: jax.Array, negatives: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Both SQN outputs from one encoder pass: Q(s, a) for the given actions (B,), logits (B, A);
        with `negatives` (N,) the sampled softmax's log P(a | s) of the given actions (B,) instead."""
        assert actions.shape == (obs.items.shape[0],), (actions.shape, obs.items.shape)
        hidden, context = self._encode(obs)
        q = self._q_taken_from_hidden(obs, hidden, context, actions)
        if negatives is not None:
            return q, self._sampled_next_item_log_probs(obs, hidden, context, actions, negatives)
        return q, self._next_item_from_hidden(obs, hidden, context)

    def factored_q_for_actions(
        self,
        obs: ObsBatch,
        actions: jax.Array,
        *,
        next_item: bool = False,
        negatives: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """The factored form's parts for one given action per state, from one encoder pass: R(s, a),
        the continuation log-odds h(s) + d_a and G(s, a) = g(s) + k_a, each (B,), and the next-item
        logits (B, A) with next_item=True (else None), or with `negatives` (N,) too the sampled
        softmax's log P(a | s) of the given actions (B,). Q(s, a) = R + sigmoid(log-odds) * G. Needs
        factored_q=True."""
        if not self.config.factored_q:
            raise ValueError("factored_q_for_actions needs NetworkConfig(factored_q=True)")
        assert actions.shape == (obs.items.shape[0],), (actions.shape, obs.items.shape)
        hidden, context = self._encode(obs)
        repeat = self._repeat_scores(obs, hidden, context)
        reward, going_on, future = self._factored_taken(hidden, obs.items, repeat, actions)
        logits: jax.Array | None = None
        if next_item and negatives is not None:
            logits = self._sampled_next_item_log_probs(obs, hidden, context, actions, negatives)
        elif next_item:
            logits = self._next_item_from_hidden(obs, hidden, context)
        return reward, going_on, future, logits

    def _factored_taken(
        self, hidden: jax.Array, items: jax.Array, repeat: jax.Array | None, actions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """R(s, a), the continuation log-odds and G(s, a) for one action per state, each (B,)."""
        reward = self.reward_state(hidden)[:, 0] + self.action_bias[actions]
        if repeat is not None:
            reward = reward + repeat_for_actions(items, repeat[..., 0], actions)
        going_on, future = self._continuation_parts(hidden)
        return reward, going_on + self.continuation_bias[actions], future + self.future_bias[actions]

    def q_and_next_item_logits(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array]:
        """Q(s, a) and the next-item logits for all actions from one encoder pass: (B, A), (B, A)."""
        if not self.config.next_item_head:
            raise ValueError("q_and_next_item_logits needs NetworkConfig(next_item_head=True)")
        hidden, context = self._encode(obs)
        return self._q_from_hidden(obs, hidden, context), self._next_item_from_hidden(obs, hidden, context)

    def expected_value_parts(self, obs: ObsBatch) -> dict[str, jax.Array]:
        """The state terms the next-item logits and Q(s, a) are built from, for a caller that scores
        the actions in chunks (needs the next-item head, not the dueling form): 'next_item' (B, E);
        either 'q_state' f(s) (B, E) or, for the factored form, 'reward' r(s), 'going_on' h(s) and
        'future' g(s), each (B,); with the repeat head 'repeat' (B, W, 2) (Q and next-item scores of
        the window's slots), 'q_window' (B, W) (Q(s, a) of each slot's item, repeat part included)
        and, in its mixture mode, 'mode' (B,), the log-odds of repeating."""
        if self.config.dueling or not self.config.next_item_head:
            raise ValueError("expected_value_parts needs next_item_head and not the dueling form")
        hidden, context = self._encode(obs)
        parts = {"next_item": self.next_item_projection(hidden)}
        if self.config.factored_q:
            going_on, future = self._continuation_parts(hidden)
            parts.update(reward=self.reward_state(hidden)[:, 0], going_on=going_on, future=future)
        else:
            parts["q_state"] = self._advantage_parts(hidden)[0]
        repeat = self._repeat_scores(obs, hidden, context)
        if repeat is not None:
            parts["repeat"] = repeat
            parts["q_window"] = jnp.stack(
                [
                    self._q_taken(hidden, obs.items, repeat, obs.items[:, slot])
                    for slot in range(obs.items.shape[1])
                ],
                axis=1,
            )  # (B, W)
            if self.config.repeat_mode == "mixture":
                parts["mode"] = self.repeat_mode_logit(hidden)[:, 0]
        return parts

    def scoring_parts(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """f(s) (B, E), V(s) (B,) or None, and the repeat head's Q scores for the window (B, W) or
        None: everything Q(s, a) is built from, so a caller can score the actions in chunks.
        """
        hidden, context = self._encode(obs)
        state, value = self._advantage_parts(hidden)
        repeat = self._repeat_scores(obs, hidden, context)
        return state, value, None if repeat is None else repeat[..., 0]

    def initialize_all(self, obs: ObsBatch) -> tuple[jax.Array, jax.Array | None]:
        """Touch every submodule so `init` creates all parameters; returns (q, logits or None)."""
        hidden, context = self._encode(obs)
        q = self._q_from_hidden(obs, hidden, context)
        logits = self._next_item_from_hidden(obs, hidden, context) if self.config.next_item_head else None
        return q, logits


def add_to_items(scores: jax.Array, items: jax.Array, repeat: jax.Array) -> jax.Array:
    """scores (B, A) plus each window slot's repeat score at its item's column (repeats add up)."""
    assert items.shape == repeat.shape and items.shape[0] == scores.shape[0], (items.shape, repeat.shape)
    rows = jnp.arange(items.shape[0])[:, None]  # (B, 1)
    return scores.at[rows, items].add(repeat)


def replace_at_items(scores: jax.Array, items: jax.Array, repeat: jax.Array) -> jax.Array:
    """scores (B, A) with each window item's column set to its repeat score (the highest of its
    slots); padding and OOV slots change nothing."""
    assert items.shape == repeat.shape and items.shape[0] == scores.shape[0], (items.shape, repeat.shape)
    rows = jnp.arange(items.shape[0])[:, None]  # (B, 1)
    cols = jnp.where(items >= FIRST_ITEM_INDEX, items, scores.shape[1])
    cleared = scores.at[rows, cols].set(-jnp.inf, mode="drop")
    return cleared.at[rows, cols].max(repeat, mode="drop")


def window_slot_log_probs(items: jax.Array, slot_scores: jax.Array) -> jax.Array:
    """The repeat mode's log-softmax over the window's slots (B, W): over the slots holding a known
    item; the rest get a finite floor, so a window without one stays finite (and so do gradients)."""
    return jax.nn.log_softmax(jnp.where(items >= FIRST_ITEM_INDEX, slot_scores, -1e30), axis=1)


def window_item_scores(items: jax.Array, slot_scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each known window item once, as `replace_at_items` scores it: (B, W) bool, whether a slot is
    its item's first known slot, and (B, W) the highest score among that item's slots."""
    known = items >= FIRST_ITEM_INDEX  # (B, W)
    same = known[:, :, None] & known[:, None, :] & (items[:, :, None] == items[:, None, :])  # (B, W, W)
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)  # (W, W): v < w
    first = known & ~(same & earlier).any(axis=2)  # (B, W)
    return first, jnp.max(jnp.where(same, slot_scores[:, None, :], -jnp.inf), axis=2)


def repeat_explore_log_probs(
    explore: jax.Array, items: jax.Array, repeat: jax.Array, mode: jax.Array
) -> jax.Array:
    """log P(a | s) (B, A) of RepeatNet's two modes (Ren et al., AAAI 2019).

    P(a) = sigmoid(mode) * softmax over the window slots of `repeat`, summed over a's slots, for a
    window item; sigmoid(-mode) * softmax of `explore` over the items outside the window for the
    rest. Which mode is right is one number per state, so the explore scores of items seen in a
    few training sessions never compete with the window items directly. A state without a known
    window item puts all its mass on exploring. explore (B, A), items and repeat (B, W), mode (B,).
    """
    assert items.shape == repeat.shape and explore.shape[0] == items.shape[0] == mode.shape[0], (
        explore.shape,
        items.shape,
        mode.shape,
    )
    batch_size, num_actions = explore.shape
    rows = jnp.arange(batch_size)[:, None]  # (B, 1)
    known = items >= FIRST_ITEM_INDEX  # (B, W)
    cols = jnp.where(known, items, num_actions)  # unknown slots scatter out of range and are dropped
    slot_log_probs = window_slot_log_probs(items, repeat)  # (B, W)
    slot_probs = jnp.where(known, jnp.exp(slot_log_probs), 0.0)  # (B, W)
    window_probs = jnp.zeros_like(explore).at[rows, cols].add(slot_probs, mode="drop")  # (B, A)
    in_window = jnp.zeros(explore.shape, bool).at[rows, cols].set(True, mode="drop")  # (B, A)
    any_known = known.any(axis=1)  # (B,)
    log_repeat = jnp.where(any_known, jax.nn.log_sigmoid(mode), -jnp.inf)  # (B,)
    log_explore = jnp.where(any_known, jax.nn.log_sigmoid(-mode), 0.0)  # (B,)
    explore_log_probs = jax.nn.log_softmax(jnp.where(in_window, -jnp.inf, explore), axis=1)  # (B, A)
    return jnp.where(
        in_window,
        log_repeat[:, None] + jnp.log(jnp.where(in_window, window_probs, 1.0)),
        log_explore[:, None] + explore_log_probs,
    )


def repeat_for_actions(items: jax.Array, repeat: jax.Array, actions: jax.Array) -> jax.Array:
    """The repeat score of one action per row, (B,): the sum over window slots holding that action."""
    assert items.shape == repeat.shape and actions.shape == items.shape[:1], (items.shape, actions.shape)
    return jnp.sum(jnp.where(items == actions[:, None], repeat, 0.0), axis=1)


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
