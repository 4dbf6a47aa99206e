"""Admission control under 2x overload: priority classes and tenant shares, with and without.

The calibrated fleet simulator (kvrouter.fleet: simulated engines behind the
router's own Rust index and scheduler) replays the Mooncake conversation trace's
requests with Poisson arrivals at twice the fleet's measured capacity. Each
request gets a priority class (high 15%, normal 60%, low 25%) and one of two
tenants sending at unequal rates (A 60%, B 40%, equal weights). The same
replay runs twice:

* no admission control: every request is routed at once (today's behaviour);
* admission control: the router's own queue (kvrouter.admission, the code the
  gRPC service runs, through the simulator's ArrivalGate hook) with the product's
  default thresholds and only `enabled: true`.

Reported per class: p99 TTFT (from arrival, so time spent in the router's queue
counts) against the class's SLO; per tenant: its share of the dispatches made
while both tenants had requests waiting in that class (deficit round robin's
contended periods), against its weight share; requests rejected (queue full),
expired (deadline passed while waiting: DEADLINE_EXCEEDED) and lost (neither
served nor answered: must be 0). SLOs are multiples of the fleet's unloaded p99
TTFT measured in the same run (high 1.5x, normal 4x, low 10x), so they follow the
calibration rather than a number picked to pass. Without admission control
there is no queue, so the tenant share is that of served requests per class.

    python -m bench.admission --quick --json bench/results/admission-quick.json
    python -m bench.admission --json bench/results/admission.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, pct, table, write_json
from kvrouter.admission import AdmissionController, Refused
from kvrouter.config import AdmissionConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.fleet import FleetConfig, FleetRequest, FleetSimulator, load_mooncake, prepare
from kvrouter.fleet.traces import MOONCAKE_CONVERSATION

CLASSES = ("high", "normal", "low")
CLASS_MIX = (0.15, 0.60, 0.25)
SLO_X_UNLOADED_P99 = {"high": 1.5, "normal": 4.0, "low": 10.0}
TENANTS = ("A", "B")
TENANT_MIX = (0.6, 0.4)
TENANT_WEIGHTS = {"A": 1.0, "B": 1.0}
OVERLOAD = 2.0
UNLOADED = 0.5  # load (share of capacity) at which the unloaded TTFT is measured
MIN_CONTESTED = 50  # dispatches a class needs for its tenant shares to count


@dataclass(frozen=True, slots=True)
class Tag:
    cls: str
    tenant: str


@dataclass
class Outcomes:
    """What became of every request of one run."""

    arrival: dict[str, float]
    dispatched: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # request id -> reason
    contested: Counter[tuple[str, str]] = field(default_factory=Counter)  # (class, tenant)


class FleetAdmission:
    """The fleet simulator's ArrivalGate over kvrouter.admission's controller: glue only
    (the queue, the classes, the shares, the deadlines and the saturation rule are the
    controller's)."""

    def __init__(self, ctl: AdmissionController[FleetRequest], tags: dict[str, Tag],
                 out: Outcomes) -> None:
        self.ctl = ctl
        self.tags = tags
        self.out = out

    def arrive(self, req: FleetRequest, now: float) -> bool:
        tag = self.tags[req.request_id]
        try:
            ticket, shed = self.ctl.offer(req, tag.cls, tag.tenant, now, sched_now=now)
        except Refused as e:
            self.out.refused[req.request_id] = e.reason
            return False
        if shed is not None:
            self.out.refused[shed.item.request_id] = "shed"
        if ticket is None:
            self.out.dispatched[req.request_id] = now
            return True
        return False

    def ready(self, now: float) -> Iterator[FleetRequest]:
        q = self.ctl.queue
        for t in q.expire(now):
            self.out.refused[t.item.request_id] = "expired"
        for t in self.ctl.ready(now, sched_now=now):
            others = q.backlogged(t.cls) - {t.tenant}
            if others:  # both tenants were waiting in this class: a contended dispatch
                self.out.contested[(q.classes[t.cls], t.tenant)] += 1
            self.out.dispatched[t.item.request_id] = now
            yield t.item


def retime(reqs: list[FleetRequest], rate: float, seed: int) -> list[FleetRequest]:
    """The same requests with Poisson arrivals at `rate` per second."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(reqs))
    times = np.cumsum(gaps) - gaps[0]
    return [FleetRequest(request_id=r.request_id, arrival_s=float(t), prompt_tokens=r.prompt_tokens,
                         output_tokens=r.output_tokens, hashes=r.hashes)
            for r, t in zip(reqs, times, strict=True)]


def tag_requests(reqs: list[FleetRequest], seed: int) -> dict[str, Tag]:
    rng = np.random.default_rng(seed + 1)
    cls = rng.choice(len(CLASSES), size=len(reqs), p=CLASS_MIX)
    ten = rng.choice(len(TENANTS), size=len(reqs), p=TENANT_MIX)
    return {r.request_id: Tag(CLASSES[c], TENANTS[t]) for r, c, t in zip(reqs, cls, ten, strict=True)}


def fleet(profile: EngineProfile, workers: int, block_size: int, seed: int) -> FleetSimulator:
    return FleetSimulator(profile, FleetConfig(num_workers=workers, seed=seed,
                                               engine=EngineConfig(block_size=block_size)))


def capacity(profile: EngineProfile, reqs: list[FleetRequest], workers: int, block_size: int,
             seed: int) -> float:
    """Requests per second the fleet completes when it always has work: every request
    arrives within a tenth of the time the fleet needs."""
    probe = fleet(profile, workers, block_size, seed).run(retime(reqs, 1e3, seed))
    finish = max(r.finish_s for r in probe.records)
    return len(probe.records) / finish


def run(profile: EngineProfile, reqs: list[FleetRequest], tags: dict[str, Tag], workers: int,
        block_size: int, seed: int, admission: AdmissionConfig | None) -> dict[str, Any]:
    sim = fleet(profile, workers, block_size, seed)
    out = Outcomes(arrival={r.request_id: r.arrival_s for r in reqs})
    gate = None
    if admission is not None:
        ctl: AdmissionController[FleetRequest] = AdmissionController(sim.scheduler, admission)
        gate = FleetAdmission(ctl, tags, out)
    t0 = time.perf_counter()
    res = sim.run(reqs, gate=gate)
    wall = time.perf_counter() - t0
    served = {r.request_id: r for r in res.records}
    per_class: dict[str, Any] = {}
    for c in CLASSES:
        ids = [rid for rid, t in tags.items() if t.cls == c]
        ttft = [(served[rid].first_token_s - out.arrival[rid]) * 1e3 for rid in ids
                if rid in served]
        wait = [(out.dispatched[rid] - out.arrival[rid]) * 1e3 for rid in ids
                if rid in out.dispatched]
        reasons = Counter(out.refused[rid] for rid in ids if rid in out.refused)
        per_class[c] = {"requests": len(ids), "served": len(ttft),
                        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                        "queue_wait_p99_ms": pct(wait, 99) if wait else 0.0,
                        "rejected": reasons["queue_full"] + reasons["shed"],
                        "expired": reasons["expired"]}
    engine_rejected = res.report.rejected  # too large for an engine's cache
    answered = len(served) + len(out.refused) + engine_rejected
    result: dict[str, Any] = {
        "requests": len(reqs), "served": len(served),
        "rejected": sum(1 for v in out.refused.values() if v in ("queue_full", "shed")),
        "expired": sum(1 for v in out.refused.values() if v == "expired"),
        "engine_rejected": engine_rejected, "lost": len(reqs) - answered,
        "hit_rate": res.report.hit_rate, "wall_s": wall, **per_class}
    result["tenant_share"], result["tenant_share_error"] = shares(out, tags, served,
                                                                  admission is not None)
    if admission is not None:
        result["counts"] = ctl.queue.counts.as_dict()
    return result


def shares(out: Outcomes, tags: dict[str, Tag], served: dict[str, Any],
           queued: bool) -> tuple[dict[str, dict[str, float]], float]:
    """Per class, each tenant's share (contended dispatches with a queue, else served
    requests) and the largest relative error against its weight share over the classes
    with at least MIN_CONTESTED dispatches."""
    wsum = sum(TENANT_WEIGHTS.values())
    per: dict[str, dict[str, float]] = {}
    err = 0.0
    for c in CLASSES:
        if queued:
            n = {t: out.contested[(c, t)] for t in TENANTS}
        else:
            n = {t: sum(1 for rid in served if tags[rid].cls == c and tags[rid].tenant == t)
                 for t in TENANTS}
        total = sum(n.values())
        if total < MIN_CONTESTED:
            continue
        per[c] = {t: n[t] / total for t in TENANTS} | {"dispatches": float(total)}
        for t in TENANTS:
            want = TENANT_WEIGHTS[t] / wsum
            err = max(err, abs(per[c][t] - want) / want)
    return per, err if per else math.nan


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(CLASSES))
    for k, (mode, label) in enumerate((("no_admission", "no admission"),
                                       ("admission", "admission"))):
        a1.bar(x + (k - 0.5) * 0.38, [result[mode][c]["ttft_p99_ms"] / 1e3 for c in CLASSES],
               0.38, label=label)
    a1.scatter(x, [result["admission"][c]["slo_ms"] / 1e3 for c in CLASSES], marker="_",
               s=900, color="k", label="SLO", zorder=3)
    a1.set_yscale("log")
    a1.set_xticks(x, CLASSES)
    a1.set_ylabel("p99 TTFT (s, log)")
    a1.set_title(f"{OVERLOAD:g}x overload, {result['workers']} workers")
    a1.legend()
    for k, mode in enumerate(("no_admission", "admission")):
        sh = result[mode]["tenant_share"].get("normal", {})
        a2.bar(np.arange(len(TENANTS)) + (k - 0.5) * 0.38, [sh.get(t, 0.0) for t in TENANTS],
               0.38, label=mode.replace("_", " "))
    a2.axhline(TENANT_WEIGHTS["A"] / sum(TENANT_WEIGHTS.values()), color="k", ls="--",
               label="weight share")
    a2.set_xticks(np.arange(len(TENANTS)), [f"tenant {t} ({m:.0%} of arrivals)"
                                            for t, m in zip(TENANTS, TENANT_MIX, strict=True)])
    a2.set_ylabel("share (normal class)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="1,500 requests (default 6,000)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=Path, default=DEFAULT_CALIBRATION)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None,
                    help="PNG path (default: beside --json)")
    args = ap.parse_args(argv)
    n = args.requests or (1500 if args.quick else 6000)
    profile = EngineProfile.load(args.profile)
    trace = load_mooncake(MOONCAKE_CONVERSATION, limit=n, name="conversation")
    base = prepare(trace, args.block_size)
    cap = capacity(profile, base, args.workers, args.block_size, args.seed)
    tags = tag_requests(base, args.seed)
    unloaded = fleet(profile, args.workers, args.block_size, args.seed).run(
        retime(base, UNLOADED * cap, args.seed))
    unloaded_p99 = unloaded.report.ttft_ms["p99"]
    slo = {c: SLO_X_UNLOADED_P99[c] * unloaded_p99 for c in CLASSES}
    reqs = retime(base, OVERLOAD * cap, args.seed)
    # The product's defaults, with admission control switched on.
    cfg = AdmissionConfig(enabled=True, tenant_weights=TENANT_WEIGHTS)
    result: dict[str, Any] = {
        "machine": machine(), "trace": "conversation", "requests": n, "workers": args.workers,
        "profile": profile.describe(), "overload": OVERLOAD, "capacity_rps": cap,
        "arrival_rps": OVERLOAD * cap, "unloaded_ttft_p99_ms": unloaded_p99,
        "class_mix": dict(zip(CLASSES, CLASS_MIX, strict=True)),
        "tenant_mix": dict(zip(TENANTS, TENANT_MIX, strict=True)),
        "tenant_weights": TENANT_WEIGHTS,
        "admission_config": cfg.model_dump(),
        "note": "simulated time (deterministic under --seed); wall_s is this machine's, noisy"}
    for mode, acfg in (("no_admission", None), ("admission", cfg)):
        r = run(profile, reqs, tags, args.workers, args.block_size, args.seed, acfg)
        for c in CLASSES:
            r[c]["slo_ms"] = slo[c]
            r[c]["meets_slo"] = bool(r[c]["ttft_p99_ms"] <= slo[c])
        result[mode] = r
    a, b = result["admission"], result["no_admission"]
    result["targets"] = {"high_holds_slo": a["high"]["meets_slo"],
                         "tenant_share_within_10pct": bool(a["tenant_share_error"] <= 0.10),
                         "lost_zero": a["lost"] == 0 and b["lost"] == 0}
    rows = [[mode, c, r[c]["served"], r[c]["ttft_p99_ms"], r[c]["slo_ms"], r[c]["rejected"],
             r[c]["expired"]] for mode, r in (("none", b), ("admission", a)) for c in CLASSES]
    print(f"capacity {cap:.2f} req/s, arrivals {OVERLOAD * cap:.2f} req/s, unloaded p99 TTFT "
          f"{unloaded_p99:.0f} ms")
    print(table(rows, ["admission", "class", "served", "ttft_p99_ms", "slo_ms", "rejected",
                       "expired"]))
    print(f"tenant share error: admission {a['tenant_share_error']:.3f}, none "
          f"{b['tenant_share_error']:.3f}; lost: admission {a['lost']}, none {b['lost']}")
    write_json(args.json, result)
    png = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if png is not None:
        plot(result, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
