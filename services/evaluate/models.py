"""The qrec Q-network trained three ways on logged behaviour, and scored over the catalogue.

- ``q_only``: the DQN's TD loss alone (`rl.train.update`, Double DQN), ranked by Q(s, a);
- ``supervised``: the next-item head alone (softmax cross-entropy on the logged next item), ranked
  by its logits: a plain supervised sequence model on the same encoder;
- ``sqn``: both losses together (`sqn_weight`), ranked by the next-item head, as in SQN (Xin et
  al., SIGIR 2020), which generates recommendations from the supervised head.

Training reuses the learner's `Trainer` (vocabulary, replay buffer, train state and the fused DQN
updates); the supervised model is the same update with the TD loss weighted 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl.batch import ObsBatch
from rl.networks import QNetwork
from rl.ranking import hit_rate, ndcg, target_ranks
from rl.train import with_next_item_prior
from services.evaluate.config import EvaluateConfig
from services.evaluate.splits import Catalogue, Interaction, Target
from services.learner.config import ModelSettings
from services.learner.trainer import Trainer
from services.state_builder.step import FEATURE_DIM

SCORE_BATCH = 512  # rows scored per compiled call (padded), so one shape compiles once


def _copy(params: Any) -> Any:
    """Parameters in buffers of their own, which later in-place updates do not reach."""
    return jax.tree.map(jnp.copy, params)


@functools.partial(jax.jit, static_argnames=("network", "head"))
def _score(params: Any, obs: ObsBatch, *, network: QNetwork, head: str) -> jax.Array:
    if head == "q":
        return network.apply(params, obs)  # type: ignore[return-value]
    return network.apply(params, obs, method=QNetwork.next_item_logits)  # type: ignore[return-value]


class NeuralModel:
    """One of q_only / supervised / sqn: trains on logged transitions, scores catalogue items."""

    def __init__(
        self,
        variant: str,
        config: EvaluateConfig,
        catalogue: Catalogue,
        train: Sequence[Interaction],
        seed: int,
    ) -> None:
        if variant not in ("q_only", "supervised", "sqn"):
            raise ValueError(f"unknown neural model {variant!r}")
        self.name = variant
        self.catalogue = catalogue
        frequency = np.zeros((len(catalogue),), np.int64)  # (C,)
        for interaction in train:
            frequency[catalogue.index[interaction.item_id]] += 1
        if len(catalogue) <= config.max_actions:
            chosen = np.arange(len(catalogue))
        else:
            # The most frequent training items; a stable sort keeps the choice deterministic.
            chosen = np.sort(np.argsort(-frequency, kind="stable")[: config.max_actions])
        settings = ModelSettings(
            window=config.window,
            vocabulary_capacity=int(chosen.size),
            embed_dim=config.embed_dim,
            hidden_sizes=config.hidden_sizes,
            repeat_head=config.repeat_head,
            gamma=config.gamma,
            learning_rate=config.learning_rate,
            sqn_weight=0.0 if variant == "q_only" else config.sqn_weight,
            next_item_negatives=0 if variant == "q_only" else config.next_item_negatives,
            batch_size=config.batch_size,
            replay_capacity=max(1, len(train)),
            seed=seed,
        )
        self.trainer = Trainer(
            settings,
            FEATURE_DIM,
            network_changes={"repeat_mode": config.repeat_mode},
            # The seed already goes into the initial parameters and the sampler; the update's config
            # is a static jit argument, so leaving the seed in it would recompile it for every run.
            learner_changes={
                "seed": 0,
                "td_weight": 0.0 if variant == "supervised" else 1.0,
                "weight_decay": config.weight_decay,
                "weight_decay_scope": config.weight_decay_scope,
            },
        )
        self.trainer.vocabulary.observe([catalogue.item_ids[i] for i in chosen], 0)
        # Catalogue index -> action index of the network, for the items it scores.
        self.scored_items = chosen  # (V,)
        self.action_of_item = self.trainer.vocabulary.lookup([catalogue.item_ids[i] for i in chosen])  # (V,)
        known = [i.transition for i in train if i.item_id in self.trainer.vocabulary]
        for start in range(0, len(known), 4096):
            self.trainer.buffer.add(self.trainer.to_batch(known[start : start + 4096]))
        self.train_transitions = len(known)
        if config.next_item_prior and self.trainer.network_config.next_item_head:
            actions = self.trainer.vocabulary.lookup([t.a_tm1 for t in known])  # (N,)
            self.trainer.state = with_next_item_prior(self.trainer.state, actions)
        self.head = "q" if variant == "q_only" else "next_item"
        # Copies: training updates the trainer's state in place, so a kept reference would not last.
        self.params = _copy(self.trainer.state.params)
        self.validation_curve: list[tuple[int, float]] = []

    def total_updates(self, epochs: float, batch_size: int) -> int:
        per_call = self.trainer.settings.updates_per_call
        wanted = max(1, math.ceil(epochs * self.train_transitions / batch_size))
        return per_call * math.ceil(wanted / per_call)

    def fit(
        self,
        epochs: float,
        eval_every: int,
        validation: Sequence[Target],
        on_updates: Callable[[int], None] = lambda n: None,
        patience: int = 0,
    ) -> None:
        """Train for `epochs` passes; keep the parameters with the best validation HR@10.

        Equal HR@10 goes to the better NDCG@10: when every window item already ranks in the top 10,
        HR@10 can stay level for many checks while the order inside the top 10 improves.

        With `patience` > 0, stop once that many checks in a row have not beaten the best: small
        logs overfit within a few epochs, and every update after that is wasted time.
        """
        if self.train_transitions == 0:
            return
        trainer = self.trainer
        total = self.total_updates(epochs, trainer.settings.batch_size)
        per_call = trainer.settings.updates_per_call
        chunk = per_call * max(1, eval_every // per_call)
        best = self._validate(validation) if validation else (float("-inf"), float("-inf"))
        self.validation_curve.append((0, best[0]))
        done = 0
        checks_since_best = 0
        while done < total and not (patience and checks_since_best >= patience):
            steps = min(chunk, total - done)
            trainer.train(steps)
            done += steps
            on_updates(steps)
            if validation:
                score = self._validate_with(trainer.state.params, validation)
                self.validation_curve.append((done, score[0]))
                checks_since_best += 1
                if score > best:
                    best, self.params, checks_since_best = score, _copy(trainer.state.params), 0
        if not validation:
            self.params = _copy(trainer.state.params)

    def _validate(self, validation: Sequence[Target]) -> tuple[float, float]:
        return self._validate_with(self.trainer.state.params, validation)

    def _validate_with(self, params: Any, validation: Sequence[Target]) -> tuple[float, float]:
        """(HR@10, NDCG@10) on the validation targets: compared in that order."""
        ranks = []
        for start in range(0, len(validation), SCORE_BATCH):
            chunk = validation[start : start + SCORE_BATCH]
            ranks.append(target_ranks(self._scores_with(params, chunk), np.asarray([t.item for t in chunk])))
        all_ranks = np.concatenate(ranks)
        return float(hit_rate(all_ranks, 10).mean()), float(ndcg(all_ranks, 10).mean())

    def scores(self, targets: Sequence[Target]) -> np.ndarray:
        """(N, C) scores; items the network has no action for get -inf (they rank last)."""
        return self._scores_with(self.params, targets)

    def _scores_with(self, params: Any, targets: Sequence[Target]) -> np.ndarray:
        out = np.full((len(targets), len(self.catalogue)), -np.inf, np.float32)  # (N, C)
        for start in range(0, len(targets), SCORE_BATCH):
            chunk = targets[start : start + SCORE_BATCH]
            transitions = [t.transition for t in chunk]
            # Pad to a fixed row count so the scorer compiles once.
            padded = transitions + [transitions[-1]] * (SCORE_BATCH - len(transitions))
            obs = self.trainer.to_batch(padded).obs_tm1
            values = np.asarray(_score(params, obs, network=self.trainer.network, head=self.head))  # (R, A)
            out[start : start + len(chunk), self.scored_items] = values[: len(chunk), self.action_of_item]
        return out
