"""bench/service's summaries of its own measurements (no timing asserted)."""

from __future__ import annotations

import numpy as np

from bench.service import _tails, server_quantiles


def test_server_quantiles_are_the_bucket_bounds_of_the_counts_between_two_scrapes() -> None:
    # cumulative counts by upper bound (s); 100 decisions between the scrapes
    before = {50e-6: 10.0, 100e-6: 20.0, 200e-6: 20.0, float("inf"): 20.0}
    after = {50e-6: 60.0, 100e-6: 115.0, 200e-6: 119.0, float("inf"): 120.0}
    q = server_quantiles(before, after)
    assert q["server_decisions"] == 100.0
    assert q["server_decide_p50_ms_at_most"] == 0.05  # 50 of 100 within 50 us
    assert q["server_decide_p99_ms_at_most"] == 0.2   # 95 within 100 us, 99 within 200 us


def test_server_quantiles_without_decisions_are_none() -> None:
    same = {50e-6: 3.0, float("inf"): 3.0}
    q = server_quantiles(same, same)
    assert q["server_decisions"] == 0.0
    assert q["server_decide_p99_ms_at_most"] is None


def test_tails_separate_one_preempted_run_from_the_route_tail() -> None:
    wall = np.full(1000, 10.0)
    wall[5:20] = 5000.0  # one run of ten preempted
    cpu = np.full(1000, 9.0)
    t = _tails(wall, cpu)
    assert t["cpu_p99_us"] == 9.0
    assert t["run_p99_median_us"] == 10.0  # the other runs' p99s
    assert t["run_p99_min_us"] == 10.0
    assert float(np.percentile(wall, 99)) == 5000.0  # the plain p99 is the preemption
