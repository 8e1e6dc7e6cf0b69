"""Pieces of the benchmarks that can be checked without running them, and the learner benchmark's
short run (what it reports, not how fast)."""

from __future__ import annotations

from typing import Any

import pytest

from services.bench import SERVICE_MEANS, _hop_latencies, _service_means
from services.bus.base import TopicSpec
from services.bus.embedded import EmbeddedBus
from services.ops.status import parse_metrics


def _samples(text: str) -> Any:
    return parse_metrics(text)


def test_service_means_are_over_what_was_observed_between_the_two_scrapes() -> None:
    before = {
        "state_builder": _samples(
            "qrec_state_builder_batch_records_count 10\nqrec_state_builder_batch_records_sum 1000\n"
            "qrec_state_builder_latency_seconds_count 500\nqrec_state_builder_latency_seconds_sum 400\n"
        ),
        "actor": {},  # not answering before: counts from zero
    }
    after = {
        "state_builder": _samples(
            "qrec_state_builder_batch_records_count 30\nqrec_state_builder_batch_records_sum 3000\n"
            "qrec_state_builder_latency_seconds_count 2500\nqrec_state_builder_latency_seconds_sum 500\n"
        ),
        "actor": _samples(
            "qrec_actor_batch_states_count 4\nqrec_actor_batch_states_sum 200\n"
            "qrec_actor_scoring_seconds_count 4\nqrec_actor_scoring_seconds_sum 0.1\n"
        ),
    }
    means = _service_means(before, after)
    assert set(means) == {key for key, *_ in SERVICE_MEANS}
    assert means["state_builder_batch_records_mean"] == 100.0  # (3000 - 1000) / (30 - 10)
    assert means["state_builder_latency_mean_ms"] == 50.0  # (500 - 400) s / 2000 records
    assert means["actor_batch_states_mean"] == 50.0
    assert means["actor_scoring_mean_ms"] == 25.0
    assert means["actor_latency_mean_ms"] is None  # nothing observed


def test_hop_latencies_time_each_record_from_send_to_read() -> None:
    bus = EmbeddedBus()
    bus.create_topics([TopicSpec("hop", 6)])
    latencies = _hop_latencies(bus, "hop", rate=2000.0, seconds=0.25)
    assert len(latencies) == 500, "every record sent in the measured part is read once; the warm-up is not"
    assert all(0.0 <= seconds < 5.0 for seconds in latencies)
    assert sorted(latencies)[len(latencies) // 2] == pytest.approx(0.0, abs=0.5)


def test_the_learner_benchmark_reports_every_figure_for_both_catalogues() -> None:
    from rl.benchmark import bench_learner

    result = bench_learner(quick=True)
    keys = ("seed_loop_tps", "jit_batch_tps", "qrec_tps", "ratio_vs_seed", "ratio_vs_jit_batch")
    keys += ("matmul_peak_flops", "achieved_flops", "layer_matmul_flops", "fraction_of_layer_matmul")
    for case, actions, item_updates in ((result, 1_000, "dense"), (result["items_100k"], 100_000, "lazy")):
        assert case["num_actions"] == actions
        assert all(case[key] > 0 for key in keys), case
        assert case["ratio_vs_seed"] == pytest.approx(case["qrec_tps"] / case["seed_loop_tps"])
        assert case["achieved_flops"] == pytest.approx(case["flops_per_update"] * case["qrec_tps"] / 256)
        # Over 10,000 actions the default update is lazy, and dense Adam is timed beside it.
        assert case["item_updates"] == item_updates
        assert ("lazy_speedup" in case) == (item_updates == "lazy")
    large = result["items_100k"]
    assert large["lazy_speedup"] == pytest.approx(large["qrec_tps"] / large["qrec_dense_items_tps"])
    # SQN's next-item loss at 100,000 actions, full and sampled softmax side by side.
    assert large["sqn_full_softmax_tps"] > 0 and large["sqn_sampled_softmax_tps"] > 0
    assert large["sqn_sampled_expected_bootstrap_tps"] > 0
    assert large["sqn_sampled_speedup"] == pytest.approx(
        large["sqn_sampled_softmax_tps"] / large["sqn_full_softmax_tps"]
    )
    assert "sqn_full_softmax_tps" not in result
