"""Disaggregated prefill/decode against aggregated serving, and the specialised mix.

A fixed budget of GPUs (16) runs a Llama-3-8B-shaped model (the H100 calibration of
the simulated engine) in the fleet simulator's disaggregated mode
(kvrouter.fleet.disagg: the engine core, the router's Rust scheduler and the same
planner as Router.Generate). Closed-loop users (concurrency) are swept, and for
disaggregated serving the prefill:decode split of the 16 GPUs too. Every (fleet,
concurrency) run gives one point: output tokens/s per GPU against tokens/s per user.
Tokens/s per user is the decode speed a user sees (output tokens after the first over
the time from first to last token, averaged over requests: 1/ITL), the axis of the
usual disaggregation Pareto plots; runs whose p90 time to first token misses the SLO
(0.5 s + 3x the unloaded prefill time of the workload's longest input) are left off
the frontier. The same numbers with end-to-end speed (output tokens over the whole
latency, TTFT included, no SLO) are in the JSON under "e2e".

The frontier of a mode is the upper envelope of its points; at a tokens/s/user x it
is interpolated (linearly in log x) between Pareto points, and below its slowest
point it is that point's throughput. Ratios compare frontiers across the 20-200
tokens/s/user band.

Workloads: short input / long output (200/1000 tokens), 3K/150, 8K/300, 32K/200 and
a mix of the four, interleaved. On the mix, the specialised fleet has an aggregated
pool, a disaggregated pool and a long-context pool (disaggregated, more prefill),
and the planner sends each request to its pool by length (SpecialisationConfig).

    python -m bench.disagg --quick --json bench/results/disagg-quick.json
    python -m bench.disagg --json bench/results/disagg.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, machine, progress, table, write_json
from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.fleet.disagg import ClosedLoop, DisaggFleetSimulator, WorkloadClass, measure
from kvrouter.fleet.simulator import FleetConfig, SchedulerWeights
from kvrouter.planner import DISAGGREGATED_POOL, LONG_CONTEXT_POOL
from kvrouter.registry import Role

log = logging.getLogger("bench.disagg")

GPUS = 16
CLASSES = {
    "short_in_long_out": WorkloadClass("short_in_long_out", 200, 1000),
    "3k_150": WorkloadClass("3k_150", 3000, 150),
    "8k_300": WorkloadClass("8k_300", 8000, 300),
    "32k_200": WorkloadClass("32k_200", 32000, 200),
}
WORKLOADS: dict[str, list[WorkloadClass]] = {name: [c] for name, c in CLASSES.items()}
WORKLOADS["mixed"] = list(CLASSES.values())
BAND = (20.0, 200.0)
AT = 50.0

Fleet = list[tuple[Role, str | None]]


def agg_fleet(n: int = GPUS) -> Fleet:
    return [(Role.AGGREGATED, None)] * n


def disagg_fleet(p: int, d: int, pool: str | None = None) -> Fleet:
    return [(Role.PREFILL, pool)] * p + [(Role.DECODE, pool)] * d


def spec_fleet(a: int, p: int, d: int, lp: int, ld: int) -> Fleet:
    return (agg_fleet(a) + disagg_fleet(p, d, DISAGGREGATED_POOL)
            + disagg_fleet(lp, ld, LONG_CONTEXT_POOL))


def sweeps(quick: bool) -> dict[str, Any]:
    if quick:
        return {"users": [4, 16, 48, 128, 256, 512], "prefill": [2, 4, 6, 8, 10, 12, 14],
                # (aggregated, prefill, decode, long-context prefill, long-context decode): most
                # prefill tokens of the mix are the 32K class's
                "spec": [(2, 2, 2, 8, 2), (2, 2, 3, 7, 2), (3, 2, 2, 7, 2), (2, 3, 3, 6, 2)],
                "requests_per_user": 4, "min_requests": 160}
    return {"users": [2, 4, 8, 16, 32, 64, 128, 256, 512],
            "prefill": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            "spec": [(a, p, d, lp, ld) for a in (1, 2, 3, 4) for p in (1, 2, 3)
                     for d in (1, 2, 3) for ld in (1, 2, 3)
                     if (lp := GPUS - a - p - d - ld) >= 4],
            "requests_per_user": 8, "min_requests": 400}


def run_point(profile: EngineProfile, fleet: Fleet, mode: str, classes: Sequence[WorkloadClass],
              users: int, requests: int, link_gbps: float, seed: int) -> dict[str, Any]:
    cfg = FleetConfig(engine=EngineConfig(link_bytes_per_s=link_gbps * 1e9),
                      weights=SchedulerWeights(), seed=seed)
    sim = DisaggFleetSimulator(profile, cfg, fleet, DisaggConfig(), mode=mode)
    res = sim.run_closed_loop(ClosedLoop(classes, users=users, requests=requests, seed=seed))
    m = measure(res)
    paths: dict[str, int] = {}
    for d in res.done:
        paths[d.path] = paths.get(d.path, 0) + 1
    return {"users": users, **asdict(m), "paths": paths, "wall_s": round(res.wall_s, 3)}


def frontier(points: Sequence[dict[str, Any]], x_key: str = "itl_tok_s_user",
             ttft_slo_s: float = math.inf) -> list[tuple[float, float]]:
    """Pareto points (tokens/s/user, tokens/s/GPU), by increasing user speed."""
    pts = sorted(((p[x_key], p["tok_s_gpu"]) for p in points
                  if math.isfinite(p[x_key]) and math.isfinite(p["tok_s_gpu"])
                  and p["ttft_p90_s"] <= ttft_slo_s),
                 key=lambda q: -q[0])
    out: list[tuple[float, float]] = []
    best = -1.0
    for x, y in pts:  # from the fastest per user down: keep those that raise throughput
        if y > best:
            out.append((x, y))
            best = y
    return out[::-1]


def achievable(front: Sequence[tuple[float, float]], x: float) -> float:
    """Tokens/s/GPU of the frontier at x tokens/s/user (NaN past its fastest point)."""
    if not front or x > front[-1][0]:
        return math.nan
    if x <= front[0][0]:
        return front[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(front):
        if x0 <= x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 1.0
            return y0 + f * (y1 - y0)
    return math.nan


def band_grid() -> list[float]:
    return [float(v) for v in np.geomspace(BAND[0], BAND[1], 21)]


def ratios(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]],
           ) -> list[float]:
    out = []
    for x in band_grid():
        a, b = achievable(num, x), achievable(den, x)
        out.append(a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan)
    return out


def _finite(vals: Sequence[float]) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


def run_workload(name: str, profile: EngineProfile, sw: dict[str, Any], link_gbps: float,
                 seed: int) -> dict[str, Any]:
    classes = WORKLOADS[name]
    fleets: dict[str, list[tuple[str, Fleet, str]]] = {
        "aggregated": [("16A", agg_fleet(), "aggregated")],
        "disaggregated": [(f"{p}P:{GPUS - p}D", disagg_fleet(p, GPUS - p), "disaggregated")
                          for p in sw["prefill"]],
    }
    if name == "mixed":
        fleets["specialised"] = [(f"{a}A+{p}P:{d}D+{lp}LP:{ld}LD", spec_fleet(a, p, d, lp, ld),
                                  "auto") for a, p, d, lp, ld in sw["spec"]]
    total = sum(len(v) for v in fleets.values()) * len(sw["users"])
    done = 0
    points: dict[str, list[dict[str, Any]]] = {}
    for mode, variants in fleets.items():
        points[mode] = []
        for label, fleet, plan_mode in variants:
            for users in sw["users"]:
                n = max(sw["min_requests"], users * sw["requests_per_user"])
                pt = run_point(profile, fleet, plan_mode, classes, users, n, link_gbps, seed)
                pt["fleet"] = label
                points[mode].append(pt)
                done += 1
                progress(done, total, f"disagg {name}")
    slo = ttft_slo(profile, classes)
    fronts = {mode: frontier(pts, ttft_slo_s=slo) for mode, pts in points.items()}
    e2e = {mode: frontier(pts, "tok_s_user") for mode, pts in points.items()}
    r = ratios(fronts["disaggregated"], fronts["aggregated"])
    re2e = ratios(e2e["disaggregated"], e2e["aggregated"])
    grid = band_grid()
    out: dict[str, Any] = {
        "classes": [asdict(c) for c in classes],
        "ttft_slo_p90_s": slo,
        "points": points,
        "e2e": {"frontier": {m: [{"tok_s_user": x, "tok_s_gpu": y} for x, y in f]
                             for m, f in e2e.items()},
                "ratio_disagg_over_agg": re2e,
                "best_ratio_disagg_over_agg": max(_finite(re2e), default=math.nan),
                "ratio_at_50_tok_s_user": _ratio_at(e2e["disaggregated"], e2e["aggregated"], AT)},
        "frontier": {m: [{"tok_s_user": x, "tok_s_gpu": y} for x, y in f]
                     for m, f in fronts.items()},
        "band_tok_s_user": grid,
        "ratio_disagg_over_agg": r,
        "best_ratio_disagg_over_agg": max(_finite(r), default=math.nan),
        "ratio_at_50_tok_s_user": _ratio_at(fronts["disaggregated"], fronts["aggregated"], AT),
    }
    if "specialised" in fronts:
        best_single = [max(_finite([achievable(fronts["aggregated"], x),
                                    achievable(fronts["disaggregated"], x)]), default=math.nan)
                       for x in grid]
        spec = [achievable(fronts["specialised"], x) for x in grid]
        so = [s / b if math.isfinite(s) and math.isfinite(b) and b > 0 else math.nan
              for s, b in zip(spec, best_single, strict=True)]
        fin = _finite(so)
        out["specialised_over_best_single_band"] = so
        out["specialised_over_best_single"] = _over_best(fronts, AT)
        out["specialised_over_best_single_summary"] = {
            "min": min(fin, default=math.nan), "max": max(fin, default=math.nan),
            "median": float(np.median(fin)) if fin else math.nan,
            "beats_both_somewhere": any(v > 1.0 for v in fin),
            "at_least_matches_everywhere": bool(fin) and all(v >= 0.999 for v in fin)}
        out["ratio_specialised_over_agg_at_50"] = _ratio_at(fronts["specialised"],
                                                             fronts["aggregated"], AT)
        out["e2e"]["specialised_over_best_single"] = _over_best(e2e, AT)
    return out


def _over_best(fronts: dict[str, list[tuple[float, float]]], x: float) -> float:
    """Specialised frontier over the better of aggregated and disaggregated at x."""
    best = max(_finite([achievable(fronts["aggregated"], x),
                        achievable(fronts["disaggregated"], x)]), default=math.nan)
    spec = achievable(fronts["specialised"], x)
    return spec / best if best > 0 and math.isfinite(spec) else math.nan


def ttft_slo(profile: EngineProfile, classes: Sequence[WorkloadClass]) -> float:
    """p90 TTFT a run must meet to count on the frontier."""
    return 0.5 + 3.0 * profile.prefill_time(max(c.input_tokens for c in classes))


def _ratio_at(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]],
              x: float) -> float:
    a, b = achievable(num, x), achievable(den, x)
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in WORKLOADS if n in result]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    colors = {"aggregated": "tab:blue", "disaggregated": "tab:orange", "specialised": "tab:green"}
    for ax, name in zip(axes.flat, names, strict=False):
        w = result[name]
        slo = w["ttft_slo_p90_s"]
        for mode, pts in w["points"].items():
            ok = [p for p in pts if p["ttft_p90_s"] <= slo]
            ax.scatter([p["itl_tok_s_user"] for p in ok], [p["tok_s_gpu"] for p in ok], s=9,
                       alpha=0.35, color=colors[mode])
            f = w["frontier"][mode]
            ax.plot([q["tok_s_user"] for q in f], [q["tok_s_gpu"] for q in f], marker="o",
                    markersize=3, color=colors[mode], label=mode, linewidth=2)
        ax.axvspan(*BAND, color="grey", alpha=0.08)
        ax.set_xscale("log")
        title = f"{name}: disagg/agg @50 tok/s/user = {w['ratio_at_50_tok_s_user']:.2f}"
        if "specialised_over_best_single" in w:
            title += f"\nspecialised/best single @50 = {w['specialised_over_best_single']:.2f}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"tokens/s per user (1/ITL; runs with p90 TTFT <= {slo:.2f}s)")
        ax.set_ylabel("output tokens/s per GPU")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{GPUS} GPUs, Llama-3-8B shape on H100 (simulated engine), "
                 f"KV link {result['config']['link_gbps']} GB/s", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer concurrencies and splits")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="PNG path (default: bench/results/disagg[-quick].png)")
    ap.add_argument("--profile", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--link-gbps", type=float, default=50.0,
                    help="prefill->decode KV link, GB/s (50: NVLink-class, 25: RDMA)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of " + ",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    if not args.link_gbps > 0:
        ap.error("--link-gbps must be > 0")
    profile = EngineProfile.load(args.profile)
    sw = sweeps(args.quick)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "disagg", "quick": args.quick, "machine": machine(),
        "config": {"gpus": GPUS, "profile": profile.name, "link_gbps": args.link_gbps,
                   "kv_bytes_per_token": profile.kv_bytes_per_token,
                   "band_tok_s_user": list(BAND), "sweeps": {k: v for k, v in sw.items()},
                   "disagg": DisaggConfig().model_dump(),
                   "tok_s_user": "mean over requests of (output tokens - 1) / (last token time - "
                                 "first token time) (1/ITL); e2e: output tokens / end-to-end "
                                 "latency",
                   "ttft_slo": "p90 TTFT <= 0.5 s + 3 x unloaded prefill time of the longest "
                               "input (e2e frontiers: no SLO)",
                   "tok_s_gpu": "output tokens per second per GPU in the steady window"},
    }
    rows = []
    for name in names:
        w = run_workload(name, profile, sw, args.link_gbps, args.seed)
        result[name] = w
        rows.append([name, w["best_ratio_disagg_over_agg"], w["ratio_at_50_tok_s_user"],
                     w.get("specialised_over_best_single", "")])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    plot_path = Path(args.plot) if args.plot else (
        REPO / "bench" / "results" / f"disagg{'-quick' if args.quick else ''}.png")
    plot(result, plot_path)
    result["plot"] = str(plot_path)
    write_json(args.json, result)
    print(table(rows, ["workload", "best disagg/agg", "disagg/agg @50", "spec/best @50"]))
    print(f"plot: {plot_path}" + (f"\njson: {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
