"""Routing quality: our policies side by side on trace replays, next to Dynamo's simulator.

For each trace (Mooncake conversation and synthetic), fleet size and arrival
speedup, the fleet simulator (kvrouter.fleet: simulated engines behind the
router's own Rust index and scheduler) replays the trace under every policy,
at Dynamo's default per-worker capacity (1,048,576 tokens) and at the capacity
calibrated for the engine profile. Dynamo's mocker replays the same trace with
its round robin and its KV router; we report its KV-over-round-robin TTFT gain
next to ours. Absolute latencies are not comparable between the two simulators
(different engine cost models); the gains and hit rates are. The default weights
were tuned on the synthetic trace (bench.tune_weights): conversation is the trace
reported, synthetic the one tuned on.

Besides the policies, kv variants run side by side: `kv_no_pressure` (the cost
without its cache-pressure term, pressure weight 0: what the term costs or gains),
`kv_no_pending` (no in-flight prefixes, pending_ttl_s 0: a routed prompt counts on its
worker only once the engine's KV events store it), `kv_approx` (every worker in
approximate mode: the router predicts the caches from its own decisions, no KV events),
`kv_mixed` (half the workers approximate) and `kv_admission` (the router's admission
queue, kvrouter.admission, enabled with its default saturation points; nothing is shed:
no wait limit, an unbounded queue; TTFT counts from the trace arrival, queue wait included).

Whether a cell is past saturation is stated with numbers: the prefill GPU-seconds the
trace needs with the pooled oracle's hits (the calibrated cost model, 8K-token chunks as
the engine runs them) over the workers' time in the arrival window. Above 1, no router
can keep up with prefill alone; decode needs more.

    python -m bench.routing --quick --json bench/results/routing-quick.json
    python -m bench.routing --json bench/results/routing.json          # whole traces
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench.admission import FleetAdmission, Outcomes, Tag
from bench.common import machine, table, write_json
from kvrouter.admission import AdmissionController
from kvrouter.config import AdmissionConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.fleet import (
    POLICIES,
    FleetConfig,
    FleetRequest,
    FleetResult,
    FleetSimulator,
    SchedulerWeights,
    Trace,
    load_mooncake,
    pooled_lru,
    prepare,
    trace_hashes,
)
from kvrouter.fleet.oracle import lru_prefix_hits
from kvrouter.fleet.report import percentiles
from kvrouter.fleet.traces import MOONCAKE_CONVERSATION, MOONCAKE_SYNTHETIC

log = logging.getLogger("bench.routing")

DYNAMO_CAPACITY_TOKENS = 1_048_576  # Dynamo mocker default: 16384 blocks of 64 tokens
# Every policy runs the product's defaults (the core's DEFAULT_WEIGHTS, what `kvrouter serve`
# uses). They were tuned by bench.tune_weights on the synthetic trace only, so the
# conversation figures are not fitted to the trace they are reported on.
TUNING_TRACE = "synthetic"
QUICK_LIMITS = {"conversation": 1500, "synthetic": 600}


class Variant(NamedTuple):
    """A kv variant: what it changes from the product's defaults."""

    pressure_weight: float | None = None
    approx_share: float = 0.0  # share of workers in approximate mode
    pending_ttl_s: float | None = None
    admission: bool = False


VARIANTS: dict[str, Variant] = {
    "kv_no_pressure": Variant(pressure_weight=0.0),
    "kv_no_pending": Variant(pending_ttl_s=0.0),
    "kv_approx": Variant(approx_share=1.0),
    "kv_mixed": Variant(approx_share=0.5),
    "kv_admission": Variant(admission=True),
}
RUNS = (*POLICIES, *VARIANTS)
# kv_admission: the default saturation points; no wait limit and an unbounded queue, so
# every request is served and TTFTs compare with the other runs'.
ADMISSION = AdmissionConfig(enabled=True, max_wait_s=1e12, max_queue=1 << 40)


def run_ours(trace: Trace, hashes: list[list[int]], profile: EngineProfile, workers: int,
             speedup: float, capacity_tokens: int, policy: str, block_size: int,
             seed: int) -> FleetResult:
    weights, v = SchedulerWeights(), VARIANTS.get(policy, Variant())
    if policy in VARIANTS:
        policy = "kv"
        if v.pressure_weight is not None:
            weights.pressure_weight = v.pressure_weight
        if v.pending_ttl_s is not None:
            weights.pending_ttl_s = v.pending_ttl_s
    cfg = FleetConfig(num_workers=workers, policy=policy,
                      approx_workers=round(workers * v.approx_share), weights=weights,
                      engine=EngineConfig(block_size=block_size,
                                          kv_capacity_tokens=capacity_tokens),
                      seed=seed)
    sim = FleetSimulator(profile, cfg)
    reqs = prepare(trace, block_size, speedup, hashes)
    if not v.admission:
        return sim.run(reqs)
    out = Outcomes(arrival={r.request_id: r.arrival_s for r in reqs})
    ctl: AdmissionController[FleetRequest] = AdmissionController(sim.scheduler, ADMISSION)
    tag = Tag("normal", "default")
    res = sim.run(reqs, gate=FleetAdmission(ctl, {r.request_id: tag for r in reqs}, out))
    if out.refused:
        raise RuntimeError(f"admission refused {len(out.refused)} requests")
    # The simulator's records start at dispatch; TTFT here counts from the trace arrival.
    res.records = [dataclasses.replace(r, arrival_s=out.arrival[r.request_id])
                   for r in res.records]
    res.report.ttft_ms = percentiles([r.ttft_s * 1000.0 for r in res.records])
    res.report.e2e_ms = percentiles([r.e2e_s * 1000.0 for r in res.records])
    return res


def prefill_seconds(profile: EngineProfile, trace: Trace, hashes: list[list[int]],
                    capacity_blocks: int, block_size: int, chunk: int) -> dict[str, float]:
    """Prefill GPU-seconds the trace needs without cache hits and with the pooled oracle's
    hits (one LRU of `capacity_blocks`), each prompt in `chunk`-token steps on top of its
    cached prefix as the engine runs it; and the attention-over-context share of the
    latter (the calibration's new x context term)."""
    def run(new: int, done: int) -> tuple[float, float]:
        t = attn = 0.0
        while new > 0:
            c = min(chunk, new)
            a = profile.attn_s_per_token_pair * c * done
            t += profile.prefill_time(c, 0) + a
            attn += a
            done += c
            new -= c
        return t, attn

    none = hit = attn = 0.0
    ks = lru_prefix_hits(hashes, capacity_blocks)
    for r, k in zip(trace.requests, ks, strict=True):
        cached = min(k * block_size, r.input_length - 1)
        none += run(r.input_length, 0)[0]
        t, a = run(r.input_length - cached, cached)
        hit += t
        attn += a
    return {"no_hits_gpu_s": none, "oracle_hits_gpu_s": hit,
            "oracle_attention_share": attn / hit if hit else 0.0}


def run_dynamo(trace_path: Path, workers: int, speedup: float) -> dict[str, Any]:
    """Dynamo's mocker on the same trace: round robin vs its KV router."""
    os.environ.setdefault("DYN_LOG", "error")
    import dynamo._core as dyn

    out: dict[str, Any] = {}
    for mode in ("round_robin", "kv_router"):
        t0 = time.perf_counter()
        res = dyn.run_mocker_trace_replay([str(trace_path)], num_workers=workers,
                                          router_mode=mode, trace_block_size=512,
                                          arrival_speedup_ratio=speedup)
        s = res.summary
        out[mode] = {"mean_ttft_ms": s["mean_ttft_ms"], "p99_ttft_ms": s["p99_ttft_ms"],
                     "hit_rate": s["prefix_cache_reused_ratio"],
                     "completed": s["completed_requests"], "wall_s": time.perf_counter() - t0}
    out["ttft_gain"] = out["round_robin"]["mean_ttft_ms"] / out["kv_router"]["mean_ttft_ms"]
    out["hit_rate"] = out["kv_router"]["hit_rate"]
    return out


def slice_file(src: Path, n: int | None, tmpdir: Path) -> Path:
    if n is None:
        return src
    dst = tmpdir / f"{src.stem}-{n}.jsonl"
    with src.open() as fin, dst.open("w") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)
    return dst


def metrics(res: FleetResult, oracle: float) -> dict[str, Any]:
    r = res.report
    out: dict[str, Any] = dict(r.summary())
    out.update({"pooled_oracle_hit_rate": oracle,
                "hit_over_oracle": r.hit_rate / oracle if oracle else float("nan"),
                "p50_itl_ms": r.itl_ms["p50"], "p90_itl_ms": r.itl_ms["p90"],
                "p90_e2e_ms": r.e2e_ms["p90"], "mean_e2e_ms": r.e2e_ms["mean"],
                "output_tokens_per_s": r.output_tokens_per_s,
                "total_tokens_per_s": r.total_tokens_per_s,
                "imbalance_requests": r.imbalance_requests,
                "imbalance_prefill_tokens": r.imbalance_prefill_tokens,
                "completed": r.completed, "rejected": r.rejected, "wall_s": res.wall_s,
                "makespan_s": r.makespan_s,
                "index_orphan_events": res.apply["orphan_events"]})
    return out


def plot_ttft_cdf(ttfts: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(ttfts), figsize=(5 * len(ttfts), 4), squeeze=False)
    for ax, (label, per_policy) in zip(axes[0], ttfts.items(), strict=True):
        for pol, vals in per_policy.items():
            v = np.sort(np.asarray(vals)) / 1000.0
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=pol)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hit_vs_size(points: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("prefix block hit rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a slice of each trace (minutes)")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--plot-dir", type=Path, default=None,
                    help="PNG output folder (default: next to --json, else bench/results)")
    ap.add_argument("--conversation", type=Path, default=MOONCAKE_CONVERSATION)
    ap.add_argument("--synthetic", type=Path, default=MOONCAKE_SYNTHETIC)
    ap.add_argument("--traces", default="conversation,synthetic")
    ap.add_argument("--workers", default="8,16")
    ap.add_argument("--speedups", default="1,2,4,8")
    ap.add_argument("--policies", default=",".join(RUNS),
                    help="policies and kv variants (kv_no_pressure, kv_approx, kv_mixed)")
    ap.add_argument("--scale-sizes", default="4,8,16,32",
                    help="fleet sizes for the hit-rate-vs-scale plot (conversation, 1x)")
    ap.add_argument("--limit", type=int, default=None, help="requests per trace (overrides)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--profile", type=Path, default=DEFAULT_CALIBRATION)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dynamo", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    profile = EngineProfile.load(args.profile)
    calibrated = profile.kv_capacity_tokens()
    capacities = {"dynamo_default": DYNAMO_CAPACITY_TOKENS, "calibrated": calibrated}
    workers_list = [int(x) for x in args.workers.split(",") if x]
    speedups = [float(x) for x in args.speedups.split(",") if x]
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in RUNS:
            ap.error(f"unknown policy {p!r}")
    paths = {"conversation": args.conversation, "synthetic": args.synthetic}
    trace_names = [t for t in args.traces.split(",") if t]
    out_dir = args.plot_dir or (args.json.parent if args.json else Path("bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""

    result: dict[str, Any] = {
        "benchmark": "routing", "quick": args.quick, "machine": machine(),
        "profile": profile.describe(), "block_size": args.block_size,
        "capacities_tokens": capacities, "kv_weights": SchedulerWeights().as_kwargs(),
        "weights_tuned_on": TUNING_TRACE,
        "results": {}, "dynamo": {}, "targets": {},
    }
    rows: list[list[Any]] = []
    cdfs: dict[str, dict[str, list[float]]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for tname in trace_names:
            if tname not in paths:
                ap.error(f"unknown trace {tname!r}")
            limit = args.limit or (QUICK_LIMITS[tname] if args.quick else None)
            trace = load_mooncake(paths[tname], limit=limit, name=tname)
            hashes = trace_hashes(trace, args.block_size)
            sliced = slice_file(paths[tname], limit, Path(tmp))
            tres: dict[str, Any] = {"requests": len(trace), "duration_s": trace.duration_s}
            result["results"][tname] = tres
            engine_chunk = EngineConfig().max_num_batched_tokens
            pf = {nw: prefill_seconds(profile, trace, hashes,
                                      nw * (DYNAMO_CAPACITY_TOKENS // args.block_size),
                                      args.block_size, engine_chunk)
                  for nw in workers_list}
            tres["prefill_gpu_s_dynamo_capacity"] = {str(nw): v for nw, v in pf.items()}
            # the reference figure as the trace states it: 512-token blocks, 8 x 1M tokens
            tres["pooled_oracle_trace_blocks_8x1M"] = pooled_lru(
                [r.content_ids for r in trace.requests], 8 * DYNAMO_CAPACITY_TOKENS // 512
            ).hit_rate
            for nw in workers_list:
                for sp in speedups:
                    window = trace.duration_s / sp
                    cell: dict[str, Any] = {"saturation": {
                        "arrival_window_s": window,
                        # > 1: prefill alone, at the pooled oracle's hits, outruns the fleet
                        "oracle_prefill_utilisation": pf[nw]["oracle_hits_gpu_s"] / (nw * window),
                    }}
                    for cname, cap in capacities.items():
                        oracle = pooled_lru(hashes, nw * (cap // args.block_size)).hit_rate
                        pol_out: dict[str, Any] = {}
                        for pol in policies:
                            res = run_ours(trace, hashes, profile, nw, sp, cap, pol,
                                           args.block_size, args.seed)
                            m = metrics(res, oracle)
                            pol_out[pol] = m
                            rows.append([tname, nw, sp, cname, pol, m["mean_ttft_ms"],
                                         m["p99_ttft_ms"], m["hit_rate"], oracle,
                                         m["imbalance"], res.wall_s])
                            if tname == "conversation" and nw == workers_list[0] \
                                    and cname == "dynamo_default":
                                cdfs.setdefault(f"{sp:g}x", {})[pol] = [
                                    r.ttft_s * 1000.0 for r in res.records]
                            print(table([rows[-1]], ["trace", "workers", "speedup", "capacity",
                                                     "policy", "mean_ttft_ms", "p99_ttft_ms",
                                                     "hit", "oracle", "imbalance", "wall_s"]
                                        ).splitlines()[-1], file=sys.stderr, flush=True)
                        if "round_robin" in pol_out:
                            rr = pol_out["round_robin"]
                            for k in ("kv", *VARIANTS):
                                if k in pol_out:
                                    pol_out[f"{k}_ttft_gain"] = (rr["mean_ttft_ms"]
                                                                 / pol_out[k]["mean_ttft_ms"])
                        cell[cname] = pol_out
                        if "kv" in pol_out:
                            cell["saturation"][f"kv_makespan_over_window_{cname}"] = (
                                pol_out["kv"]["makespan_s"] / window)
                    if not args.no_dynamo:
                        d = run_dynamo(sliced, nw, sp)
                        cell["dynamo"] = d
                        result["dynamo"].setdefault(f"{sp:g}", {"runs": {}})
                        result["dynamo"][f"{sp:g}"]["runs"].setdefault(tname, {})[str(nw)] = d
                        if tname == "conversation" and nw == 8:
                            result["dynamo"][f"{sp:g}"]["ttft_gain"] = d["ttft_gain"]
                            result["dynamo"][f"{sp:g}"]["hit_rate"] = d["hit_rate"]
                    tres.setdefault(str(nw), {})[f"{sp:g}"] = cell
            # hit rate against fleet size: conversation, 1x, Dynamo's capacity per worker
            if tname == "conversation" and args.scale_sizes:
                scale: dict[str, list[tuple[int, float]]] = {}
                cap = DYNAMO_CAPACITY_TOKENS
                for nw in [int(x) for x in args.scale_sizes.split(",") if x]:
                    scale.setdefault("pooled oracle", []).append(
                        (nw, pooled_lru(hashes, nw * (cap // args.block_size)).hit_rate))
                    for pol in ("kv", "prefix_only", "round_robin"):
                        res = run_ours(trace, hashes, profile, nw, 1.0, cap, pol,
                                       args.block_size, args.seed)
                        scale.setdefault(pol, []).append((nw, res.report.hit_rate))
                tres["hit_rate_vs_workers"] = {k: dict((str(a), b) for a, b in v)
                                               for k, v in scale.items()}
                plot_hit_vs_size(scale, out_dir / f"routing-hit-vs-workers{suffix}.png",
                                 f"conversation ({len(trace)} requests), 1x, 1M tokens/worker")
    if cdfs:
        plot_ttft_cdf(cdfs, out_dir / f"routing-ttft-cdf{suffix}.png",
                      f"TTFT CDF, conversation, {workers_list[0]} workers, 1M tokens/worker")
    # targets (reported, not asserted)
    conv = result["results"].get("conversation", {})
    tg: dict[str, Any] = {}
    for sp in speedups:
        cell = conv.get("8", {}).get(f"{sp:g}")
        if not cell:
            continue
        ours = cell["dynamo_default"]
        kv = ours.get("kv")
        tg[f"{sp:g}"] = {
            "kv_hit_over_oracle": kv["hit_over_oracle"] if kv else None,
            "kv_ttft_gain": ours.get("kv_ttft_gain"),
            "dynamo_ttft_gain": cell.get("dynamo", {}).get("ttft_gain"),
            "kv_imbalance": kv["imbalance"] if kv else None,
            "meets_hit_target": bool(kv and kv["hit_over_oracle"] >= 0.9),
            "meets_gain_target": bool(kv and "dynamo" in cell
                                      and ours["kv_ttft_gain"] >= cell["dynamo"]["ttft_gain"]),
            "meets_imbalance_target": bool(kv and kv["imbalance"] <= 1.3),
        }
    result["targets"] = tg
    # every cell at Dynamo's default capacity (issue 14 item 4), with its saturation figures
    cells: dict[str, Any] = {}
    for tname, tres in result["results"].items():
        for nw in workers_list:
            for sp in speedups:
                cell = tres.get(str(nw), {}).get(f"{sp:g}")
                if not cell or "kv" not in cell["dynamo_default"]:
                    continue
                ours = cell["dynamo_default"]
                dyn_gain = cell.get("dynamo", {}).get("ttft_gain")
                gain = ours.get("kv_ttft_gain")
                sat = cell["saturation"]
                cells[f"{tname}/{nw}/{sp:g}x"] = {
                    "kv_hit_over_oracle": ours["kv"]["hit_over_oracle"],
                    "kv_no_pending_hit_over_oracle": ours.get("kv_no_pending", {}).get(
                        "hit_over_oracle"),
                    "kv_ttft_gain": gain, "dynamo_ttft_gain": dyn_gain,
                    "kv_admission_ttft_gain": ours.get("kv_admission_ttft_gain"),
                    "oracle_prefill_utilisation": sat["oracle_prefill_utilisation"],
                    "kv_makespan_over_window": sat.get("kv_makespan_over_window_dynamo_default"),
                    "past_saturation": sat["oracle_prefill_utilisation"] > 1.0,
                    "meets_hit_target": ours["kv"]["hit_over_oracle"] >= 0.9,
                    "meets_gain_target": bool(gain is not None and dyn_gain is not None
                                              and gain >= dyn_gain),
                }
    result["targets_cells"] = cells
    result["wall_s"] = time.perf_counter() - t_start
    print(table(rows, ["trace", "workers", "speedup", "capacity", "policy", "mean_ttft_ms",
                       "p99_ttft_ms", "hit", "oracle", "imbalance", "wall_s"]))
    dyn_rows = [[sp, tn, nw, d["round_robin"]["mean_ttft_ms"], d["kv_router"]["mean_ttft_ms"],
                 d["ttft_gain"], d["hit_rate"]]
                for sp, v in result["dynamo"].items() for tn, per in v["runs"].items()
                for nw, d in per.items()]
    if dyn_rows:
        print(table(dyn_rows, ["speedup", "trace", "workers", "dyn_rr_ttft_ms", "dyn_kv_ttft_ms",
                               "dyn_gain", "dyn_hit"]))
    print(table([[k, v["kv_hit_over_oracle"], v["kv_ttft_gain"], v["dynamo_ttft_gain"],
                  v["kv_imbalance"]] for k, v in tg.items()],
                ["speedup", "kv_hit/oracle", "kv_gain", "dynamo_gain", "kv_imbalance"]))
    print(table([[k, v["kv_hit_over_oracle"], v["kv_no_pending_hit_over_oracle"],
                   v["kv_ttft_gain"], v["dynamo_ttft_gain"], v["kv_admission_ttft_gain"],
                   v["oracle_prefill_utilisation"], v["kv_makespan_over_window"]]
                  for k, v in cells.items()],
                ["cell (Dynamo capacity)", "kv_hit/oracle", "no_pending", "kv_gain",
                 "dynamo_gain", "admission_gain", "oracle_prefill_util", "kv_makespan/window"]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
