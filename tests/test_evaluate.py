"""`qrec evaluate`: splits, exact baseline rankings on a hand-made log, and runs on real log slices."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import msgspec
import numpy as np
import pytest

from schemas.messages import ClickEvent
from services.cli import main
from services.config import ConfigError
from services.evaluate.baselines import Cooccurrence, Popularity, Recent, TabularQ, popularity_counts
from services.evaluate.config import EvaluateConfig
from services.evaluate.report import aggregate, spread
from services.evaluate.splits import Catalogue, Target, load_log, split_keys, split_log, targets_for
from tests.helpers import DIGINETICA, TAOBAO, require_shared_data

T0 = 1_700_000_000_000


def _write_log(path: Path, sessions: dict[str, list[tuple[str, str, str | None]]]) -> Path:
    """One user per session; each event (item, event type, category) a minute after the previous."""
    events = []
    for number, (user, items) in enumerate(sessions.items()):
        for step, (item, event_type, category) in enumerate(items):
            events.append(
                ClickEvent(
                    event_id=f"{user}-{step}",
                    user_id=user,
                    session_id=f"{user}-s",
                    event_type=event_type,  # type: ignore[arg-type]
                    timestamp=T0 + number * 3_600_000 + step * 60_000,
                    item_id=item,
                    category=category,
                )
            )
    path.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in events))
    return path


def _target(catalogue: Catalogue, recent: list[str], item: str, any_transition) -> Target:
    return Target(
        item=catalogue.index[item],
        kind="click",
        recent=tuple(catalogue.index[i] for i in recent),
        transition=any_transition,
    )


def _order(catalogue: Catalogue, scores: np.ndarray) -> list[str]:
    return [catalogue.item_ids[i] for i in np.argsort(-scores, kind="stable")]


def test_user_splits_are_disjoint_8_1_1_and_deterministic():
    keys = [f"user-{i}" for i in range(815)]
    train, validation, test = split_keys(keys, seed=7)
    assert (len(train), len(validation), len(test)) == (651, 82, 82)  # 815 / 10 = 81.5 -> 82
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert train | validation | test == set(keys)
    assert split_keys(reversed(keys), seed=7) == (train, validation, test)  # order does not matter
    assert split_keys(keys, seed=8)[2] != test
    assert [len(part) for part in split_keys([f"k{i}" for i in range(100)], 0)] == [80, 10, 10]


def test_log_splits_by_user_session_and_time(tmp_path):
    sessions = {f"u{i}": [("a", "view", None), ("b", "view", None)] for i in range(20)}
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    assert len(log.interactions) == 40
    by_users = split_log(log, "users", seed=1)
    assert (len(by_users.train), len(by_users.validation), len(by_users.test)) == (32, 4, 4)
    assert not {i.user_id for i in by_users.train} & {i.user_id for i in by_users.test}
    by_time = split_log(log, "time", seed=1)
    assert max(i.timestamp for i in by_time.train) <= min(i.timestamp for i in by_time.test)
    assert (len(by_time.train), len(by_time.validation), len(by_time.test)) == (32, 4, 4)


def test_baselines_rank_a_hand_made_log_exactly(tmp_path):
    # Counts: a 2, b 3, c 2, d 1.  Next-item pairs: a->b twice, b->c twice, b->d once.
    sessions = {
        "u1": [("a", "view", None), ("b", "view", None), ("c", "view", None)],
        "u2": [("a", "view", None), ("b", "view", None), ("d", "view", None)],
        "u3": [("b", "view", None), ("c", "view", None)],
    }
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    assert catalogue.item_ids == ["a", "b", "c", "d"]
    counts = popularity_counts(log.interactions, catalogue)
    assert counts.tolist() == [2.0, 3.0, 2.0, 1.0]
    any_transition = log.interactions[0].transition

    [row] = Popularity(counts).scores([_target(catalogue, [], "a", any_transition)])
    assert _order(catalogue, row) == ["b", "a", "c", "d"]

    # Recently seen first (most recent first), then popularity.
    [row] = Recent(counts).scores([_target(catalogue, ["a", "d"], "a", any_transition)])
    assert _order(catalogue, row) == ["d", "a", "b", "c"]

    # Window 1: only the last item's followers count: after b come c (2) then d (1).
    [row] = Cooccurrence(log.interactions, catalogue, counts, window=1).scores(
        [_target(catalogue, ["a", "b"], "c", any_transition)]
    )
    assert _order(catalogue, row) == ["c", "d", "b", "a"]
    # Window 2: b's followers weigh 1, a's 0.5: c = 2 + 0.5, d = 1 + 0.5, b = 0.5 * 2; then a by popularity.
    [row] = Cooccurrence(log.interactions, catalogue, counts, window=2).scores(
        [_target(catalogue, ["a", "b"], "c", any_transition)]
    )
    assert _order(catalogue, row) == ["c", "d", "b", "a"]
    assert row[catalogue.index["c"]] > row[catalogue.index["d"]] > row[catalogue.index["b"]] > row[0]


def test_tabular_q_prefers_the_category_users_move_to(tmp_path):
    # Users always go from category x (a, b) to category y (c, d): Q(x, y) > Q(x, x) = 0.
    sessions = {
        "u1": [("a", "view", "x"), ("c", "view", "y")],
        "u2": [("b", "view", "x"), ("d", "view", "y")],
        "u3": [("a", "view", "x"), ("d", "view", "y")],
    }
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    counts = popularity_counts(log.interactions, catalogue)  # a 2, b 1, c 1, d 2
    model = TabularQ(
        log.interactions,
        catalogue,
        counts,
        log.categories,
        epochs=3,
        learning_rate=0.5,
        gamma=0.0,
        epsilon=0.0,
        buckets=10,
        seed=0,
    )
    [row] = model.scores([_target(catalogue, ["a"], "c", log.interactions[0].transition)])
    # Category y first (d before c by popularity), then category x (a before b).
    assert _order(catalogue, row) == ["d", "c", "a", "b"]


def test_session_protocol_targets_every_prefix_with_the_session_window(tmp_path):
    sessions = {"u1": [("a", "view", None), ("b", "purchase", None), ("c", "add_to_cart", None)]}
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    sqn = targets_for(log.interactions, catalogue, "sqn")
    assert [(t.kind, catalogue.item_ids[t.item]) for t in sqn] == [("click", "a"), ("purchase", "b")]
    session = targets_for(log.interactions, catalogue, "session")
    assert [catalogue.item_ids[t.item] for t in session] == ["b", "c"]
    assert [t.recent for t in session] == [(0,), (0, 1)]


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model"):
        EvaluateConfig(log="x", models="dqn,magic")
    with pytest.raises(ConfigError, match="--train"):
        EvaluateConfig()
    with pytest.raises(ConfigError, match="split"):
        EvaluateConfig(log="x", split="random")
    with pytest.raises(ConfigError, match="weight_decay must be >= 0"):
        EvaluateConfig(log="x", weight_decay=-0.1)
    with pytest.raises(ConfigError, match="weight_decay_scope"):
        EvaluateConfig(log="x", weight_decay_scope="biases")
    with pytest.raises(ConfigError, match="repeat_mode"):
        EvaluateConfig(log="x", repeat_mode="copy")
    with pytest.raises(ConfigError, match="next_item_negatives must be >= 0"):
        EvaluateConfig(log="x", next_item_negatives=-1)


def test_next_item_negatives_reach_the_next_item_models_and_not_q_only(tmp_path):
    from services.evaluate.models import NeuralModel

    sessions = {"u0": [("d", "view", None), ("a", "view", None), ("b", "view", None)]}
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    config = EvaluateConfig(log="unused", embed_dim=8, hidden_sizes="16", batch_size=4, next_item_negatives=3)
    for variant, negatives in (("sqn", 3), ("supervised", 3), ("q_only", 0)):
        model = NeuralModel(variant, config, catalogue, log.interactions, seed=0)
        assert model.trainer.learner_config.next_item_negatives == negatives, variant


QUICK = [
    "--seeds",
    "1",
    "--epochs",
    "0.5",
    "--eval-every",
    "8",
    "--batch-size",
    "64",
    "--embed-dim",
    "16",
    "--hidden-sizes",
    "32",
    "--max-actions",
    "400",
    "--tabular-epochs",
    "1",
    "--json",
    "--no-progress",
]


@pytest.mark.timeout(600)
def test_evaluate_json_on_a_taobao_slice(tmp_path, capsys):
    require_shared_data(TAOBAO)
    code = main(["evaluate", str(TAOBAO), "--limit", "3000", "--out", str(tmp_path), *QUICK])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    models = result["models"]
    expected = {"dqn", "q_only", "supervised", "sqn", "popularity", "cooccurrence", "recent", "tabular_q"}
    assert set(models) == expected
    for name in expected:
        assert set(models[name]) == {"click", "purchase"}
        assert set(models[name]["click"]) == {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"}
        click = models[name]["click"]
        assert 0.0 <= click["ndcg@10"] <= click["hr@10"] <= click["hr@20"] <= 1.0
        assert len(result["spread"][name]["click"]["hr@10"]["runs"]) == 1
    assert models["dqn"] == models[result["dqn_variant"]]
    assert (tmp_path / "evaluate.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["models"]["recent"] == models["recent"]


@pytest.mark.timeout(600)
def test_session_protocol_on_a_given_diginetica_split(tmp_path, capsys):
    require_shared_data(DIGINETICA)
    lines = DIGINETICA.read_text().splitlines()
    header, rows = lines[0], lines[1:3001]
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("\n".join([header, *rows[:2500]]) + "\n")
    test.write_text("\n".join([header, *rows[2500:]]) + "\n")
    code = main(
        [
            "evaluate",
            "--train",
            str(train),
            "--test",
            str(test),
            "--protocol",
            "session",
            "--models",
            "dqn,popularity,recent",
            "--dqn-variant",
            "q_only",
            "--out",
            str(tmp_path),
            *QUICK,
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "given" and result["protocol"] == "session"
    assert set(result["models"]) == {"dqn", "popularity", "recent"}
    assert set(result["models"]["recent"]["next_item"]) == {
        "hr@5",
        "hr@10",
        "hr@20",
        "mrr@5",
        "mrr@10",
        "mrr@20",
    }
    # Re-viewing within a session is common: the recently-seen list finds some next items.
    assert result["models"]["recent"]["next_item"]["hr@10"] > 0.0


def test_spread_over_seeds_is_mean_std_and_a_t_interval():
    summary = spread([0.1, 0.2, 0.3])
    assert summary["mean"] == pytest.approx(0.2)
    assert summary["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # Student t, 2 degrees of freedom, 97.5%
    assert summary["ci_low"] == pytest.approx(0.2 - half) and summary["ci_high"] == pytest.approx(0.2 + half)
    means, spreads = aggregate({"recent": {"click": [{"hr@10": 0.5}, {"hr@10": 0.7}]}})
    assert means == {"recent": {"click": {"hr@10": pytest.approx(0.6)}}}
    assert spreads["recent"]["click"]["hr@10"]["runs"] == [0.5, 0.7]
    assert np.isnan(spread([0.4])["std"])


def test_missing_log_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.csv"), "--no-progress"]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_training_stops_after_patience_checks_without_a_new_best_and_keeps_the_best(tmp_path, monkeypatch):
    from services.evaluate.models import NeuralModel

    sessions = {f"u{n}": [("a", "view", None), ("b", "view", None), ("c", "cart", None)] for n in range(40)}
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    config = EvaluateConfig(log="unused", embed_dim=8, hidden_sizes="16", batch_size=8, max_actions=10)
    model = NeuralModel("supervised", config, catalogue, log.interactions, seed=0)
    # (HR@10, NDCG@10) in check order: the 4th check ties the best HR@10 with a better NDCG@10 and
    # becomes the best; 3 checks without a new best follow (the last ties HR@10 with a worse NDCG).
    checks = [(0.0, 0.0), (0.2, 0.1), (0.5, 0.3), (0.4, 0.2), (0.5, 0.35), (0.3, 0.1), (0.45, 0.2)]
    scores = iter([*checks, (0.5, 0.3), (0.9, 0.5)])
    kept: list[object] = []

    def fake_validate(params, validation):
        score = next(scores)
        kept.append(jax.tree.map(np.array, params))  # a copy: training goes on in the same buffers
        return score

    monkeypatch.setattr(model, "_validate_with", fake_validate)
    targets = targets_for(log.interactions, catalogue, "sqn")
    per_call = model.trainer.settings.updates_per_call
    model.fit(epochs=100, eval_every=per_call, validation=targets, patience=3)
    assert [score for _, score in model.validation_curve] == [0.0, 0.2, 0.5, 0.4, 0.5, 0.3, 0.45, 0.5]
    assert [done for done, _ in model.validation_curve] == [n * per_call for n in range(8)]
    # The parameters of the best check, not the last.
    jax.tree.map(np.testing.assert_array_equal, model.params, kept[4])
    last_table = kept[-1]["params"]["item_embedding"]["embedding"]
    assert not np.array_equal(model.params["params"]["item_embedding"]["embedding"], last_table)


def test_neural_model_starts_from_the_training_prior_with_the_configured_mode_and_decay(tmp_path):
    from services.evaluate.models import NeuralModel

    # Items taken (each interaction is a transition with its item as the action): a 3 times, b twice,
    # c and d once.
    sessions = {"u0": [("d", "view", None), ("a", "view", None), ("a", "view", None), ("b", "view", None)]}
    sessions["u1"] = [("c", "view", None), ("b", "view", None), ("a", "view", None)]
    log = load_log(_write_log(tmp_path / "log.jsonl", sessions), window=10)
    catalogue = Catalogue.of([log])
    config = EvaluateConfig(
        log="unused",
        embed_dim=8,
        hidden_sizes="16",
        batch_size=4,
        next_item_prior=True,
        repeat_mode="mixture",
        weight_decay=0.5,
    )
    model = NeuralModel("sqn", config, catalogue, log.interactions, seed=0)
    assert model.trainer.network_config.repeat_mode == "mixture"
    assert model.trainer.learner_config.weight_decay == 0.5
    bias = np.asarray(model.trainer.state.params["params"]["next_item_bias"])
    action = dict(zip("abcd", model.trainer.vocabulary.lookup(list("abcd")), strict=True))
    counts = np.zeros(bias.shape)
    counts[[action["a"], action["b"], action["c"], action["d"]]] = [3, 2, 1, 1]
    expected = np.log1p(counts) - np.log1p(counts).mean()
    np.testing.assert_allclose(bias, expected, rtol=1e-6, atol=1e-6)
    model.fit(epochs=1, eval_every=8, validation=targets_for(log.interactions, catalogue, "sqn"))
    scores = model.scores(targets_for(log.interactions, catalogue, "sqn"))
    assert scores.shape == (7, len(catalogue)) and np.all(np.isfinite(scores))
