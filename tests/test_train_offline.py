"""Offline training from a real log: the held-out TD loss falls, and the outputs are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from services.learner.config import TrainConfig
from services.learner.offline import train_from_log
from services.learner.trainer import load_bundle
from tests.helpers import TAOBAO, require_shared_data


# Both item-table updates: dense Adam, and the lazy one the learner uses above 10,000 actions.
@pytest.mark.parametrize("item_updates", ["dense", "lazy"])
def test_training_on_a_real_log_lowers_the_held_out_td_loss(tmp_path: Path, item_updates: str) -> None:
    require_shared_data(TAOBAO)
    head = tmp_path / "head.csv"
    with TAOBAO.open("rb") as source:
        head.write_bytes(b"".join(line for _, line in zip(range(8000), source, strict=False)))
    out = tmp_path / "train"
    config = TrainConfig(
        from_log=str(head),
        out=str(out),
        steps=160,
        eval_every=80,
        vocabulary_capacity=3000,
        embed_dim=16,
        hidden_sizes="64,64",
        repeat_head=True,
        item_updates=item_updates,
        batch_size=64,
        updates_per_call=8,
        holdout_fraction=0.2,
        progress=False,
    )
    result = train_from_log(config, Console(file=open(tmp_path / "log.txt", "w")))  # noqa: SIM115
    assert result.holdout_transitions > 100
    assert result.holdout_td_loss[-1] < 0.5 * result.holdout_td_loss[0], result.holdout_td_loss
    summary = json.loads((out / "summary.json").read_text())
    assert summary["holdout_td_loss"] == result.holdout_td_loss
    assert (out / "learning_curve.png").stat().st_size > 1000
    network_config, bundle = load_bundle((out / "model.bin").read_bytes())
    assert network_config.num_actions == 3002 and bundle.feature_dim == 61
    assert network_config.repeat_head  # the setting reaches the published model
