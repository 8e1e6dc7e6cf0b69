"""The actor's A/B split over every policy, baselines included."""

from __future__ import annotations

import pytest

from services.actor.step import POLICIES, parse_split
from services.config import ConfigError
from services.demo import DEFAULT_POLICIES


def test_every_baseline_can_be_split_to() -> None:
    assert {"dqn", "popularity", "random", "bandit", "tabular_q", "oracle"} == set(POLICIES)
    split = parse_split("dqn=0.2,bandit=0.2,tabular_q=0.2,popularity=0.1,random=0.1,oracle=0.2", "salt")
    assert split.names == ("dqn", "bandit", "tabular_q", "popularity", "random", "oracle")
    assert split.cumulative == pytest.approx((0.2, 0.4, 0.6, 0.7, 0.8, 1.0))


def test_split_shares_hold_for_the_new_policies() -> None:
    split = parse_split(DEFAULT_POLICIES, "qrec-ab-1")
    users = [f"shopper-{i:05d}" for i in range(20_000)]
    counts = {name: 0 for name in split.names}
    for user in users:
        counts[split.policy_for(user)] += 1
    expected = {
        "dqn": 0.2,
        "bandit": 0.16,
        "tabular_q": 0.16,
        "popularity": 0.16,
        "random": 0.16,
        "oracle": 0.16,
    }
    for name, share in expected.items():
        # 20,000 users: a binomial share's standard deviation is at most 0.0035.
        assert counts[name] / len(users) == pytest.approx(share, abs=0.015), name
    assert all(split.policy_for(user) == split.policy_for(user) for user in users[:100])


def test_unknown_policy_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match=r"'greedy=1\.0'"):
        parse_split("greedy=1.0", "salt")
