"""A fixed-capacity numpy replay buffer of transitions, uniform or prioritized (Schaul et al., 2016).

Storage is preallocated column arrays (one per field, for s_tm1 and s_t), so adding and sampling are
vectorised copies with no per-transition Python objects. Prioritized sampling is proportional:
P(i) = p_i^alpha / sum_j p_j^alpha with p_i = |td_i| + epsilon, drawn through a sum tree, and the
importance weights (N * P(i))^-beta are divided by the batch maximum so they only ever scale the
loss down.
"""

from __future__ import annotations

import jax
import numpy as np

from rl.batch import ObsBatch, TransitionBatch, check_transition_batch


class SumTree:
    """Binary sum tree over `capacity` non-negative leaves: vectorised prefix-sum search and updates."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._num_leaves = 1 << max(0, (capacity - 1).bit_length())
        # float64: the root is a sum of up to millions of leaves, and float32 drift would bias sampling.
        self._tree = np.zeros(2 * self._num_leaves, np.float64)  # node i has children 2i, 2i+1; root 1

    @property
    def total(self) -> float:
        return float(self._tree[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self._tree[self._num_leaves + np.asarray(indices, np.int64)]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves (a later duplicate index wins) and recompute their ancestors."""
        nodes = self._num_leaves + np.asarray(indices, np.int64).reshape(-1)
        values = np.asarray(values, np.float64).reshape(-1)
        assert nodes.shape == values.shape, (nodes.shape, values.shape)
        if np.any(values < 0) or not np.all(np.isfinite(values)):
            raise ValueError("priorities must be finite and >= 0")
        self._tree[nodes] = values
        for _ in range(self._num_leaves.bit_length() - 1):  # one level per step, leaves to root
            nodes = np.unique(nodes // 2)
            self._tree[nodes] = self._tree[2 * nodes] + self._tree[2 * nodes + 1]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each value v in [0, total), the leaf i with cumsum(<i) <= v < cumsum(<=i)."""
        values = np.asarray(prefix_sums, np.float64).copy()
        nodes = np.ones(values.shape, np.int64)
        for _ in range(self._num_leaves.bit_length() - 1):  # one level per step, root to leaves
            left = 2 * nodes
            left_sum = self._tree[left]
            go_right = values >= left_sum
            values = np.where(go_right, values - left_sum, values)
            nodes = np.where(go_right, left + 1, left)
        return nodes - self._num_leaves


class ReplayBuffer:
    """Ring buffer of transitions; the oldest are overwritten first once `capacity` is reached."""

    def __init__(
        self,
        capacity: int,
        *,
        window: int,
        feature_dim: int,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta: float = 0.4,
        priority_epsilon: float = 1e-6,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if window < 0 or feature_dim < 0:
            raise ValueError(f"window and feature_dim must be >= 0, got {window}, {feature_dim}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if priority_epsilon <= 0:
            raise ValueError(f"priority_epsilon must be > 0, got {priority_epsilon}")
        self.capacity = capacity
        self.window = window
        self.feature_dim = feature_dim
        self.prioritized = prioritized
        self.alpha = alpha
        self.beta = beta
        self.priority_epsilon = priority_epsilon
        self._obs_arrays = {
            name: {
                "items": np.zeros((capacity, window), np.int32),  # (N, W)
                "event_types": np.zeros((capacity, window), np.int32),  # (N, W)
                "gaps": np.zeros((capacity, window), np.float32),  # (N, W)
                "features": np.zeros((capacity, feature_dim), np.float32),  # (N, D)
            }
            for name in ("obs_tm1", "obs_t")
        }
        self._a_tm1 = np.zeros((capacity,), np.int32)  # (N,)
        self._r_t = np.zeros((capacity,), np.float32)  # (N,)
        self._discount_t = np.zeros((capacity,), np.float32)  # (N,)
        self._logged = np.zeros((capacity,), np.float32)  # (N,)
        self._size = 0
        self._next = 0  # slot the next transition is written to
        self._tree = SumTree(capacity) if prioritized else None
        # New transitions get the largest priority seen so far, so each is sampled soon at least once.
        self._max_priority = 1.0

    def __len__(self) -> int:
        return self._size

    def add(self, batch: TransitionBatch) -> np.ndarray:
        """Append a batch (numpy arrays; its weights are ignored); returns the slots written, (n,)."""
        check_transition_batch(batch)
        if batch.obs_tm1.window != self.window or batch.obs_tm1.feature_dim != self.feature_dim:
            raise ValueError(
                f"batch has window {batch.obs_tm1.window} and {batch.obs_tm1.feature_dim} features; "
                f"buffer expects {self.window} and {self.feature_dim}"
            )
        count = batch.batch_size
        if count == 0:
            return np.zeros((0,), np.int64)
        # More rows than capacity: only the newest `capacity` rows would survive anyway.
        keep = slice(max(0, count - self.capacity), count)
        written = min(count, self.capacity)
        skipped = count - written
        slots = (self._next + skipped + np.arange(written)) % self.capacity  # (n,)
        for name, obs in (("obs_tm1", batch.obs_tm1), ("obs_t", batch.obs_t)):
            arrays = self._obs_arrays[name]
            arrays["items"][slots] = np.asarray(obs.items)[keep]
            arrays["event_types"][slots] = np.asarray(obs.event_types)[keep]
            arrays["gaps"][slots] = np.asarray(obs.gaps)[keep]
            arrays["features"][slots] = np.asarray(obs.features)[keep]
        self._a_tm1[slots] = np.asarray(batch.a_tm1)[keep]
        self._r_t[slots] = np.asarray(batch.r_t)[keep]
        self._discount_t[slots] = np.asarray(batch.discount_t)[keep]
        self._logged[slots] = np.asarray(batch.logged)[keep]
        self._next = int((self._next + count) % self.capacity)
        self._size = min(self.capacity, self._size + count)
        if self._tree is not None:
            self._tree.set(slots, np.full(slots.shape, self._max_priority**self.alpha))
        return slots

    def _gather(self, indices: np.ndarray, weights: np.ndarray) -> TransitionBatch:
        def obs(name: str) -> ObsBatch:
            arrays = self._obs_arrays[name]
            return ObsBatch(
                items=arrays["items"][indices],
                event_types=arrays["event_types"][indices],
                gaps=arrays["gaps"][indices],
                features=arrays["features"][indices],
            )

        return TransitionBatch(
            obs_tm1=obs("obs_tm1"),
            a_tm1=self._a_tm1[indices],
            r_t=self._r_t[indices],
            discount_t=self._discount_t[indices],
            obs_t=obs("obs_t"),
            weights=weights,
            logged=self._logged[indices],
        )

    def _sample_indices(
        self, batch_size: int, rng: np.random.Generator, beta: float
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self._tree is None:
            indices = rng.integers(0, self._size, size=batch_size)  # (B,)
            return indices, np.ones((batch_size,), np.float32)
        total = self._tree.total
        # Stratified: one draw per equal slice of the total mass, which lowers the variance of the
        # batch composition without changing each draw's marginal probability p_i / total.
        bounds = np.arange(batch_size, dtype=np.float64) * (total / batch_size)
        draws = bounds + rng.random(batch_size) * (total / batch_size)
        draws = np.minimum(draws, np.nextafter(total, 0.0))
        indices = self._tree.find(draws)
        # Rounding can walk past the last stored leaf (zero mass); such a draw belongs to the last one.
        indices = np.minimum(indices, self._size - 1)
        probabilities = self._tree.get(indices) / total  # (B,)
        weights = (self._size * probabilities) ** (-beta)
        weights = (weights / weights.max()).astype(np.float32)  # (B,)
        return indices, weights

    def sample(
        self, batch_size: int, rng: np.random.Generator, *, beta: float | None = None
    ) -> tuple[TransitionBatch, np.ndarray, np.ndarray]:
        """Draw `batch_size` transitions with replacement: (batch, slot indices (B,), weights (B,)).

        The returned batch's `weights` field holds the same importance weights (all 1 when uniform).
        `beta` overrides the buffer's beta for this draw (e.g. annealed towards 1).
        """
        indices, weights = self._sample_indices(batch_size, rng, self.beta if beta is None else beta)
        return self._gather(indices, weights), indices, weights

    def sample_stacked(
        self, num_batches: int, batch_size: int, rng: np.random.Generator, *, beta: float | None = None
    ) -> tuple[TransitionBatch, np.ndarray, np.ndarray]:
        """K independent batches stacked for `update_many`: arrays (K, B, ...), indices and weights (K, B).

        All K are drawn from the current priorities; priorities updated after the fused updates
        apply to the next draw (the usual lag of prioritized replay with multi-step learners).
        """
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        beta = self.beta if beta is None else beta
        drawn = [self._sample_indices(batch_size, rng, beta) for _ in range(num_batches)]
        indices = np.stack([pair[0] for pair in drawn])  # (K, B)
        weights = np.stack([pair[1] for pair in drawn])  # (K, B)
        flat = self._gather(indices.reshape(-1), weights.reshape(-1))
        batch = _reshape_leading(flat, num_batches, batch_size)
        return batch, indices, weights

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Set priorities |td| + epsilon for sampled slots; a no-op for a uniform buffer.

        A slot overwritten since it was sampled takes the priority meant for its predecessor, as in
        the reference implementations; with a buffer much larger than a batch this is rare.
        """
        if self._tree is None:
            return
        indices = np.asarray(indices, np.int64).reshape(-1)
        td_errors = np.asarray(td_errors, np.float64).reshape(-1)
        assert indices.shape == td_errors.shape, (indices.shape, td_errors.shape)
        if indices.size and (indices.min() < 0 or indices.max() >= self._size):
            raise ValueError(f"indices must be in [0, {self._size})")
        priorities = np.abs(td_errors) + self.priority_epsilon
        if not np.all(np.isfinite(priorities)):
            raise ValueError("td_errors must be finite")
        if priorities.size:
            self._max_priority = max(self._max_priority, float(priorities.max()))
        self._tree.set(indices, priorities**self.alpha)

    def priorities(self) -> np.ndarray:
        """Current sampling masses p_i^alpha of the stored slots, (len,); ones for a uniform buffer."""
        if self._tree is None:
            return np.ones((self._size,), np.float64)
        return self._tree.get(np.arange(self._size))


def _reshape_leading(batch: TransitionBatch, num_batches: int, batch_size: int) -> TransitionBatch:
    return jax.tree.map(lambda leaf: leaf.reshape((num_batches, batch_size, *leaf.shape[1:])), batch)
