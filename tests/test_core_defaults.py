"""Scoring defaults, policy names and apply counters are the core's, declared once
(rust/src/scoring.rs, rust/src/scheduler.rs, rust/src/index.rs): every Python copy reads them."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import kvrouter
from kvrouter import DEFAULT_POLICY, DEFAULT_WEIGHTS, POLICIES, ApplyResult, PrefixIndex, Scheduler
from kvrouter.config import ModelConfig, PolicyName, RouterConfig, Weights
from kvrouter.counters import ApplyTotals
from kvrouter.fleet import POLICIES as FLEET_POLICIES
from kvrouter.fleet import SchedulerWeights


def test_config_defaults_are_the_cores() -> None:
    w, m, r = Weights(), ModelConfig(name="m"), RouterConfig()
    assert m.policy == DEFAULT_POLICY
    assert m.scheduler_kwargs(r.lease_s, r.report_ttl_s) | {"seed": None} == {
        "policy": DEFAULT_POLICY, **DEFAULT_WEIGHTS, "seed": None}
    assert (w.prefill, w.decode, w.queue, w.queued_prefill) == (
        DEFAULT_WEIGHTS["prefill_weight"], DEFAULT_WEIGHTS["decode_weight"],
        DEFAULT_WEIGHTS["queue_weight"], DEFAULT_WEIGHTS["queued_prefill_weight"])


def test_fleet_simulator_defaults_are_the_cores() -> None:
    kwargs = SchedulerWeights().as_kwargs()
    assert kwargs == {k: v for k, v in DEFAULT_WEIGHTS.items() if k not in ("lease_s", "report_ttl_s")}
    assert {f.name for f in dataclasses.fields(SchedulerWeights)} <= set(DEFAULT_WEIGHTS)


def test_scheduler_without_settings_scores_like_the_defaults() -> None:
    idx = PrefixIndex(4)
    idx.apply_stored(1, [1, 2], router_hashes=[11, 12], tier="host")
    implicit = Scheduler(idx, seed=3)
    explicit = Scheduler(idx, seed=3, policy=DEFAULT_POLICY, **DEFAULT_WEIGHTS)  # type: ignore[arg-type]
    for s in (implicit, explicit):
        s.add_worker(1)
        s.add_worker(2)
        s.reserve(2, "busy", 40, 9)
    a = implicit.route_hashes([11, 12, 13], 12, explain=True, reserve=False)
    b = explicit.route_hashes([11, 12, 13], 12, explain=True, reserve=False)
    assert [c.cost for c in a.candidates] == [c.cost for c in b.candidates]
    assert implicit.policy == DEFAULT_POLICY


def test_policy_names_are_the_cores() -> None:
    assert DEFAULT_POLICY in POLICIES
    assert typing.get_args(PolicyName) == POLICIES
    assert FLEET_POLICIES == POLICIES
    # The stub's Literal (what type checkers see) lists the same names in the same order.
    stub = ast.parse(Path(kvrouter.__file__).with_name("_core.pyi").read_text())
    alias = next(n for n in stub.body if isinstance(n, ast.Assign)
                 and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "PolicyName")
    assert isinstance(alias.value, ast.Subscript) and isinstance(alias.value.slice, ast.Tuple)
    assert tuple(ast.literal_eval(e) for e in alias.value.slice.elts) == POLICIES


def test_apply_counters_are_declared_once() -> None:
    idx = PrefixIndex(4)
    r = idx.apply_stored(1, [1, 2], router_hashes=[11, 12])
    assert tuple(r.as_dict()) == ApplyResult.FIELDS
    assert r.as_dict()["stored_blocks"] == 2
    totals = ApplyTotals().add(r).add(idx.apply_stored(1, [1], router_hashes=[11]))
    assert tuple(totals) == ApplyResult.FIELDS
    assert totals["stored_blocks"] == 2 and totals["duplicate_blocks"] == 1
    assert set(idx.stats()) >= set(ApplyResult.FIELDS)
