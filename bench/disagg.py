"""Disaggregated prefill/decode against aggregated serving, and the specialised mix.

A fixed budget of GPUs (16) runs a Llama-3-8B-shaped model (the H100 calibration of
the simulated engine) in the fleet simulator's disaggregated mode
(kvrouter.fleet.disagg: the engine core, the router's Rust scheduler and the same
planner as Router.Generate). Every fleet is driven by closed-loop users
(concurrency); every (fleet, concurrency) run gives one point: output tokens/s per
GPU against tokens/s per user.

* Tokens/s per user is the decode speed a user sees: per request, output tokens
  after the first over the time from first to last token (KV transfer and any wait
  for a decode slot included), averaged over requests (1 / mean ITL). The same
  numbers with end-to-end speed (output tokens over the whole latency, TTFT
  included, no SLO) are in the JSON under "e2e".
* Tokens/s per GPU: output tokens in the steady window / (window x 16). The window
  opens once every user has finished its first request (the start-up burst is over)
  and closes when the users stop sending.
* TTFT SLO, the same for every mode: a run counts only if, for every request class
  in it, p90 TTFT <= 0.5 s + 3 x that class's unloaded TTFT (the engine's own
  chunked prefill of the class's input on an idle GPU). A fleet that queues its
  prefills (a small prefill pool) misses it; one that stalls its decodes instead
  (aggregated, chunked prefill first) pays in tokens/s per user.
* The frontier of a mode at x tokens/s/user is the best tokens/s/GPU of any of its
  runs that meet the SLO with at least x tokens/s/user (a staircase: only measured
  operating points, no interpolation). Ratios compare frontiers across the 20-200
  tokens/s/user band.

Sweeps. Aggregated: 16 aggregated engines, chunked-prefill budget
(max_num_batched_tokens) 8192 and 2048 (the usual knob for inter-token latency).
Disaggregated: every prefill:decode split of the 16 GPUs (quick: every other one).
Specialised (mixed workload only): an aggregated pool, a disaggregated pool and a
long-context pool (disaggregated, more prefill); the planner sends each request to
its pool by length (SpecialisationConfig: short <= 1024 input tokens, or output >=
input; long >= 16384). Concurrency climbs a geometric ladder from 4 users per fleet
until the run misses the SLO or falls below 20 tokens/s/user, then the last step is
bisected (in log users) to place the fleet's knee.

Engines: max_num_seqs 1024 (vLLM v1's default on 80 GB GPUs; the KV cache, about
460K tokens, is the real limit), 64-token blocks. Disaggregated pools always prefill
remotely (the planner's saturated-prefill fallback to local prefill is switched off,
so the pure and the specialised disaggregated pools follow one policy).

Workloads: short input / long output (200/1000 tokens), 3K/150, 8K/300, 32K/200 and
a mix of the four, interleaved (each request's class drawn uniformly); lengths vary
by +-10%.

    python -m bench.disagg --quick --json bench/results/disagg-quick.json
    python -m bench.disagg --json bench/results/disagg.json
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, machine, table, write_json
from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.engine import SimEngine, SimRequest
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
MID = math.sqrt(BAND[0] * BAND[1])  # geometric middle of the band, ~63 tokens/s/user
MAX_NUM_SEQS = 1024
AGG_CHUNKS = (8192, 2048)  # aggregated chunked-prefill budgets (max_num_batched_tokens)
DISAGG_CHUNK = 8192
# SLO: p90 TTFT of each class <= SLO_BASE_S + SLO_FACTOR x its unloaded TTFT
SLO_BASE_S = 0.5
SLO_FACTOR = 3.0
# the climb ends when throughput grows slower than users**SATURATED (0.1: doubling the
# users adds < 7% throughput, so the fleet is saturated)
SATURATED = 0.1
# every disaggregated pool prefills remotely, as the pure disaggregated mode does
NO_FALLBACK = 1 << 40

Fleet = list[tuple[Role, str | None]]


def agg_fleet(n: int = GPUS) -> Fleet:
    return [(Role.AGGREGATED, None)] * n


def disagg_fleet(p: int, d: int, pool: str | None = None) -> Fleet:
    return [(Role.PREFILL, pool)] * p + [(Role.DECODE, pool)] * d


def spec_fleet(a: int, p: int, d: int, lp: int, ld: int) -> Fleet:
    return (agg_fleet(a) + disagg_fleet(p, d, DISAGGREGATED_POOL)
            + disagg_fleet(lp, ld, LONG_CONTEXT_POOL))


def _ladder(lo: int, hi: int, per_octave: int) -> list[int]:
    out: list[int] = []
    for k in range(round(math.log2(hi / lo) * per_octave) + 1):
        u = round(lo * 2 ** (k / per_octave))
        if u not in out:
            out.append(u)
    return out


def sweeps(quick: bool) -> dict[str, Any]:
    """Sweep settings. The specialised splits (aggregated, prefill, decode, long-context
    prefill, long-context decode) follow the mix's arithmetic: per four requests ~2.4 s
    of prefill GPU time, ~90% of it the 32K class's, so most GPUs are long-context
    prefill; the aggregated pool carries the short class's 1000-token decodes."""
    if quick:
        return {"users": _ladder(4, 8192, 1), "refine": 1,
                "prefill": [2, 4, 6, 8, 10, 12, 14], "agg_chunks": list(AGG_CHUNKS),
                "spec": [(2, 1, 1, 10, 2), (1, 2, 1, 10, 2), (2, 2, 1, 9, 2), (2, 1, 1, 9, 3),
                         (1, 1, 1, 11, 2), (2, 2, 2, 8, 2)],
                "requests_per_user": 4, "min_requests": 160}
    return {"users": _ladder(4, 8192, 2), "refine": 2,
            "prefill": list(range(1, GPUS)), "agg_chunks": list(AGG_CHUNKS),
            "spec": [(a, p, d, GPUS - a - p - d - ld, ld) for a in (1, 2, 3) for p in (1, 2, 3)
                     for d in (1, 2) for ld in (1, 2, 3)],
            "requests_per_user": 4, "min_requests": 300}


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class FleetTask:
    workload: str
    mode: str  # aggregated | disaggregated | specialised
    label: str
    fleet: tuple[tuple[Role, str | None], ...]
    plan_mode: str  # the planner's mode: aggregated | disaggregated | auto
    chunk: int  # max_num_batched_tokens of every engine


@functools.cache
def _profile(path: str) -> EngineProfile:
    return EngineProfile.load(path)


def engine_config(chunk: int, link_gbps: float) -> EngineConfig:
    return EngineConfig(max_num_batched_tokens=chunk, max_num_seqs=MAX_NUM_SEQS,
                        link_bytes_per_s=link_gbps * 1e9)


def run_point(profile: EngineProfile, task: FleetTask, classes: Sequence[WorkloadClass],
              users: int, requests: int, link_gbps: float, seed: int) -> dict[str, Any]:
    cfg = FleetConfig(engine=engine_config(task.chunk, link_gbps), weights=SchedulerWeights(),
                      seed=seed)
    sim = DisaggFleetSimulator(profile, cfg, list(task.fleet),
                               DisaggConfig(prefill_queue_max_tokens=NO_FALLBACK),
                               mode=task.plan_mode)
    res = sim.run_closed_loop(ClosedLoop(classes, users=users, requests=requests, seed=seed))
    m = measure(res)
    paths: dict[str, int] = {}
    for d in res.done:
        paths[d.path] = paths.get(d.path, 0) + 1
    return {"users": users, "fleet": task.label, "chunk": task.chunk, **asdict(m),
            "paths": paths, "wall_s": round(res.wall_s, 3)}


def unloaded_ttft(profile: EngineProfile, input_tokens: int) -> float:
    """TTFT of one request of `input_tokens` on an idle engine (chunked prefill)."""
    eng = SimEngine(profile, engine_config(DISAGG_CHUNK, 50.0))
    req = SimRequest("probe", [], input_tokens, 2)
    eng.submit(req, 0.0)
    eng.run_until(math.inf)
    assert req.first_token_time is not None
    return req.first_token_time


def slo_by_class(profile: EngineProfile, classes: Sequence[WorkloadClass]) -> dict[str, float]:
    return {c.name: SLO_BASE_S + SLO_FACTOR * unloaded_ttft(profile, c.input_tokens)
            for c in classes}


def meets_slo(pt: dict[str, Any], slo: dict[str, float]) -> bool:
    return all(v <= slo[c] for c, v in pt["ttft_p90_by_class"].items())


def _usable(pt: dict[str, Any], slo: dict[str, float]) -> bool:
    """Worth climbing past: meets the SLO and is not yet below the band."""
    x = pt["itl_tok_s_user"]
    return meets_slo(pt, slo) and math.isfinite(x) and x >= BAND[0]


def sweep_fleet(task: FleetTask, profile_path: str, sw: dict[str, Any], link_gbps: float,
                seed: int, slo: dict[str, float]) -> list[dict[str, Any]]:
    """One fleet's concurrency ladder, stopped at its knee, then the knee bisected."""
    profile = _profile(profile_path)
    classes = WORKLOADS[task.workload]

    def point(users: int) -> dict[str, Any]:
        n = max(sw["min_requests"], users * sw["requests_per_user"])
        return run_point(profile, task, classes, users, n, link_gbps, seed)

    pts: list[dict[str, Any]] = []
    lo: int | None = None
    hi: int | None = None
    for u in sw["users"]:
        pt = point(u)
        pts.append(pt)
        if not _usable(pt, slo):
            hi = u
            break
        if len(pts) > 1 and (math.log(max(pt["tok_s_gpu"], 1e-9) / pts[-2]["tok_s_gpu"])
                             < SATURATED * math.log(u / pts[-2]["users"])):
            # saturated: more users only queue, at the same throughput and a lower speed
            # per user (dominated points), so the climb ends here
            break
        lo = u
    if lo is not None and hi is not None:
        for _ in range(sw["refine"]):
            mid = round(math.sqrt(lo * hi))
            if mid in (lo, hi):
                break
            pt = point(mid)
            pts.append(pt)
            if _usable(pt, slo):
                lo = mid
            else:
                hi = mid
    return sorted(pts, key=lambda p: p["users"])


def fleet_tasks(name: str, sw: dict[str, Any]) -> list[FleetTask]:
    longest = max(c.input_tokens for c in WORKLOADS[name])
    # a smaller chunk budget only changes anything for inputs longer than it
    tasks = [FleetTask(name, "aggregated", f"16A/c{c}", tuple(agg_fleet()), "aggregated", c)
             for c in sw["agg_chunks"] if c == DISAGG_CHUNK or c < longest]
    tasks += [FleetTask(name, "disaggregated", f"{p}P:{GPUS - p}D",
                        tuple(disagg_fleet(p, GPUS - p)), "disaggregated", DISAGG_CHUNK)
              for p in sw["prefill"]]
    if name == "mixed":
        tasks += [FleetTask(name, "specialised", f"{a}A+{p}P:{d}D+{lp}LP:{ld}LD",
                            tuple(spec_fleet(a, p, d, lp, ld)), "auto", DISAGG_CHUNK)
                  for a, p, d, lp, ld in sw["spec"]]
    return tasks


def run_tasks(tasks: Sequence[FleetTask], jobs: int,
              fn: Callable[[FleetTask], list[dict[str, Any]]],
              ) -> dict[FleetTask, list[dict[str, Any]]]:
    """Every fleet's sweep, `jobs` at a time, with progress on stderr."""
    out: dict[FleetTask, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    total_pts = 0

    def note(task: FleetTask, pts: list[dict[str, Any]]) -> None:
        nonlocal total_pts
        out[task] = pts
        total_pts += len(pts)
        sys.stderr.write(f"[disagg {time.perf_counter() - t0:7.1f}s] {len(out)}/{len(tasks)} "
                         f"fleets, {total_pts} runs: {task.workload} {task.label} "
                         f"(users {pts[0]['users']}..{pts[-1]['users']})\n")
        sys.stderr.flush()

    if jobs <= 1:
        for t in tasks:
            note(t, fn(t))
        return out
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        pending: dict[Future[list[dict[str, Any]]], FleetTask] = {ex.submit(fn, t): t
                                                                  for t in tasks}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                note(pending.pop(f), f.result())
    return out


# --------------------------------------------------------------------------- frontiers


def frontier(points: Sequence[dict[str, Any]], x_key: str = "itl_tok_s_user",
             slo: dict[str, float] | None = None) -> list[tuple[float, float]]:
    """Pareto points (tokens/s/user, tokens/s/GPU) by increasing user speed (so decreasing
    throughput); with `slo`, only runs that meet it."""
    pts = sorted(((p[x_key], p["tok_s_gpu"]) for p in points
                  if math.isfinite(p[x_key]) and math.isfinite(p["tok_s_gpu"])
                  and (slo is None or meets_slo(p, slo))),
                 key=lambda q: (-q[0], -q[1]))
    out: list[tuple[float, float]] = []
    best = -1.0
    for x, y in pts:  # from the fastest per user down: keep those that raise throughput
        if y > best:
            out.append((x, y))
            best = y
    return out[::-1]


def achievable(front: Sequence[tuple[float, float]], x: float) -> float:
    """Best tokens/s/GPU of a run with at least x tokens/s/user (NaN: none that fast)."""
    ys = [y for xx, y in front if xx >= x]
    return max(ys) if ys else math.nan


def band_grid() -> list[float]:
    return [float(v) for v in np.geomspace(BAND[0], BAND[1], 21)]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def ratio_at(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]],
             x: float) -> float:
    return _ratio(achievable(num, x), achievable(den, x))


def ratios(num: Sequence[tuple[float, float]], den: Sequence[tuple[float, float]],
           ) -> list[float]:
    return [ratio_at(num, den, x) for x in band_grid()]


def _finite(vals: Sequence[float]) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


def _band_summary(vals: Sequence[float]) -> dict[str, Any]:
    fin = _finite(vals)
    return {"min": min(fin, default=math.nan), "max": max(fin, default=math.nan),
            "median": float(np.median(fin)) if fin else math.nan,
            "defined_at": len(fin), "of": len(vals)}


def _best_single(fronts: dict[str, list[tuple[float, float]]], x: float) -> float:
    return max(_finite([achievable(fronts["aggregated"], x),
                        achievable(fronts["disaggregated"], x)]), default=math.nan)


def summarise(name: str, points: dict[str, list[dict[str, Any]]],
              slo: dict[str, float]) -> dict[str, Any]:
    classes = WORKLOADS[name]
    fronts = {mode: frontier(pts, slo=slo) for mode, pts in points.items()}
    e2e = {mode: frontier(pts, "tok_s_user") for mode, pts in points.items()}
    r = ratios(fronts["disaggregated"], fronts["aggregated"])
    re2e = ratios(e2e["disaggregated"], e2e["aggregated"])

    def as_json(f: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
        return {m: [{"tok_s_user": x, "tok_s_gpu": y} for x, y in v] for m, v in f.items()}

    out: dict[str, Any] = {
        "classes": [asdict(c) for c in classes],
        "ttft_slo_p90_s": slo,
        "points": points,
        "frontier": as_json(fronts),
        "band_tok_s_user": band_grid(),
        "ratio_disagg_over_agg": r,
        "ratio_band_summary": _band_summary(r),
        "best_ratio_disagg_over_agg": max(_finite(r), default=math.nan),
        "ratio_at_50_tok_s_user": ratio_at(fronts["disaggregated"], fronts["aggregated"], AT),
        "ratio_at_mid_band": ratio_at(fronts["disaggregated"], fronts["aggregated"], MID),
        "e2e": {"frontier": as_json(e2e), "ratio_disagg_over_agg": re2e,
                "best_ratio_disagg_over_agg": max(_finite(re2e), default=math.nan),
                "ratio_at_50_tok_s_user": ratio_at(e2e["disaggregated"], e2e["aggregated"], AT)},
    }
    if "specialised" in fronts:
        so = [_ratio(achievable(fronts["specialised"], x), _best_single(fronts, x))
              for x in band_grid()]
        fin = _finite(so)
        out["specialised_over_best_single_band"] = so
        out["specialised_over_best_single"] = _ratio(achievable(fronts["specialised"], AT),
                                                     _best_single(fronts, AT))
        out["specialised_over_best_single_summary"] = {
            **_band_summary(so),
            "beats_both_somewhere": any(v > 1.0 for v in fin),
            "at_least_matches_everywhere": bool(fin) and all(v >= 0.999 for v in fin),
            # band points where only the specialised fleet meets the SLO at that speed
            "only_specialised_at": [x for x in band_grid()
                                    if math.isfinite(achievable(fronts["specialised"], x))
                                    and not math.isfinite(_best_single(fronts, x))]}
        out["ratio_specialised_over_agg_at_50"] = ratio_at(fronts["specialised"],
                                                           fronts["aggregated"], AT)
        out["e2e"]["specialised_over_best_single"] = _ratio(
            achievable(e2e["specialised"], AT), _best_single(e2e, AT))
    return out


# --------------------------------------------------------------------------- output


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
            ok = [p for p in pts if meets_slo(p, slo)]
            ax.scatter([p["itl_tok_s_user"] for p in ok], [p["tok_s_gpu"] for p in ok], s=9,
                       alpha=0.3, color=colors[mode])
            f = w["frontier"][mode]
            ax.step([q["tok_s_user"] for q in f], [q["tok_s_gpu"] for q in f], where="pre",
                    marker="o", markersize=3, color=colors[mode], label=mode, linewidth=2)
        ax.axvspan(*BAND, color="grey", alpha=0.08)
        ax.set_xscale("log")
        ax.set_yscale("log")
        title = (f"{name}: disagg/agg @50 tok/s/user = {w['ratio_at_50_tok_s_user']:.2f}, "
                 f"best {w['best_ratio_disagg_over_agg']:.2f}")
        if "specialised_over_best_single" in w:
            title += f"\nspecialised/best single @50 = {w['specialised_over_best_single']:.2f}"
        ax.set_title(title, fontsize=10)
        slo_txt = ", ".join(f"{v:.2f}" for v in slo.values())
        ax.set_xlabel(f"tokens/s per user (1/ITL); runs with p90 TTFT <= {slo_txt} s")
        ax.set_ylabel("output tokens/s per GPU")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{GPUS} GPUs, Llama-3-8B shape on H100 (simulated engine), "
                 f"KV link {result['config']['link_gbps']} GB/s; frontier = best run with at "
                 f"least that speed per user", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="coarser ladders, fewer splits")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="PNG path (default: beside --json, else bench/results/)")
    ap.add_argument("--profile", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--link-gbps", type=float, default=50.0,
                    help="prefill->decode KV link, GB/s (50: NVLink-class, 25: RDMA)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of " + ",".join(WORKLOADS))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="fleets simulated in parallel (processes)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    if not args.link_gbps > 0:
        ap.error("--link-gbps must be > 0")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    profile = _profile(args.profile)
    sw = sweeps(args.quick)
    t0 = time.perf_counter()
    slos = {n: slo_by_class(profile, WORKLOADS[n]) for n in names}
    tasks = [t for n in names for t in fleet_tasks(n, sw)]
    # the longest sweeps first, so that the last to finish are short
    weight = {"mixed": 4, "short_in_long_out": 3, "32k_200": 2}
    tasks.sort(key=lambda t: -weight.get(t.workload, 1))
    fn = functools.partial(_sweep_task, profile_path=args.profile, sw=sw,
                           link_gbps=args.link_gbps, seed=args.seed, slos=slos)
    done = run_tasks(tasks, args.jobs, fn)
    result: dict[str, Any] = {
        "bench": "disagg", "quick": args.quick, "machine": machine(),
        "config": {"gpus": GPUS, "profile": profile.name, "link_gbps": args.link_gbps,
                   "kv_bytes_per_token": profile.kv_bytes_per_token,
                   "band_tok_s_user": list(BAND), "mid_band_tok_s_user": MID,
                   "sweeps": sw, "max_num_seqs": MAX_NUM_SEQS,
                   "disagg": DisaggConfig(prefill_queue_max_tokens=NO_FALLBACK).model_dump(),
                   "tok_s_user": "mean over requests of (output tokens - 1) / (last token time - "
                                 "first token time) (1/ITL); e2e: output tokens / end-to-end "
                                 "latency",
                   "ttft_slo": f"per class: p90 TTFT <= {SLO_BASE_S} s + {SLO_FACTOR} x the "
                               "class's unloaded TTFT (e2e frontiers: no SLO)",
                   "frontier": "best tokens/s/GPU of a run meeting the SLO with at least x "
                               "tokens/s/user (staircase, no interpolation)",
                   "tok_s_gpu": "output tokens per second per GPU in the steady window"},
    }
    rows = []
    for name in names:
        points: dict[str, list[dict[str, Any]]] = {}
        for t in fleet_tasks(name, sw):
            points.setdefault(t.mode, []).extend(done[t])
        w = summarise(name, points, slos[name])
        result[name] = w
        b = w["ratio_band_summary"]
        rows.append([name, w["best_ratio_disagg_over_agg"], w["ratio_at_50_tok_s_user"],
                     w["ratio_at_mid_band"], f"{b['min']:.2f}..{b['max']:.2f}",
                     w.get("specialised_over_best_single", "")])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    default_png = f"disagg{'-quick' if args.quick else ''}.png"
    plot_path = Path(args.plot) if args.plot else (
        Path(args.json).with_suffix(".png") if args.json
        else REPO / "bench" / "results" / default_png)
    plot(result, plot_path)
    result["plot"] = str(plot_path)
    write_json(args.json, result)
    print(table(rows, ["workload", "best disagg/agg", "@50", f"@{MID:.0f}", "band",
                       "spec/best @50"]))
    print(f"plot: {plot_path}" + (f"\njson: {args.json}" if args.json else ""))
    print(f"wall: {result['wall_s']} s")
    return 0


def _sweep_task(task: FleetTask, *, profile_path: str, sw: dict[str, Any], link_gbps: float,
                seed: int, slos: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return sweep_fleet(task, profile_path, sw, link_gbps, seed, slos[task.workload])


if __name__ == "__main__":
    sys.exit(main())
