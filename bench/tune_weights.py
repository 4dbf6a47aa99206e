"""How the kv policy's default weights were chosen: a grid on the TUNING trace only.

The defaults `kvrouter serve` uses live in the Rust core (rust/src/scoring.rs,
`Weights::default`). They are tuned here on the Mooncake *synthetic* trace and
reported by bench.routing on the *conversation* trace, so the reported figures
are not fitted to the trace they are reported on.

For every (decode_weight, queued_prefill_weight) pair of the grid, the fleet
simulator (the service's own scoring path) replays the tuning trace at 8 workers,
at two arrival speedups and at both per-worker capacities bench.routing uses; a
pair's score is the geometric mean over those cells of its mean TTFT relative to
the current defaults (lower is better), reported with its hit rate and p99.
`--grid pressure` sweeps the cache-pressure weight instead, the other weights at their
defaults.

    python -m bench.tune_weights --json bench/results/tune_weights.json
    python -m bench.tune_weights --grid pressure --json bench/results/tune_pressure.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine, progress, table, write_json
from bench.routing import DYNAMO_CAPACITY_TOKENS
from kvrouter import DEFAULT_WEIGHTS
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.fleet import FleetConfig, FleetSimulator, SchedulerWeights, load_mooncake, prepare, trace_hashes
from kvrouter.fleet.traces import MOONCAKE_SYNTHETIC

DECODE = (0.05, 0.1, 0.25, 0.5, 1.0)
QUEUED_PREFILL = (0.1, 0.25, 0.5, 1.0)
PRESSURE = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", type=Path, default=MOONCAKE_SYNTHETIC, help="the tuning trace")
    ap.add_argument("--limit", type=int, default=0, help="requests of the tuning trace (0: all)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--speedups", default="1,4")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--profile", type=Path, default=DEFAULT_CALIBRATION)
    ap.add_argument("--grid", choices=("decode_queued", "pressure"), default="decode_queued")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    profile = EngineProfile.load(args.profile)
    capacities = {"dynamo_default": DYNAMO_CAPACITY_TOKENS, "calibrated": profile.kv_capacity_tokens()}
    speedups = [float(s) for s in args.speedups.split(",") if s]
    trace = load_mooncake(args.trace, limit=args.limit or None, name=args.trace.stem)
    hashes = trace_hashes(trace, args.block_size)
    cells = [(sp, cname, cap) for sp in speedups for cname, cap in capacities.items()]
    # Each grid point: the SchedulerWeights fields it sets (the rest keep their defaults).
    names = (("pressure_weight",) if args.grid == "pressure"
             else ("decode_weight", "queued_prefill_weight"))
    weights: dict[str, float] = {n: DEFAULT_WEIGHTS[n] for n in names}  # type: ignore[literal-required]
    default = tuple(weights[n] for n in names)
    values = (PRESSURE,) if args.grid == "pressure" else (DECODE, QUEUED_PREFILL)
    grid = sorted(set(itertools.product(*values)) | {default})

    t0 = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    total = len(grid) * len(cells)
    done = 0
    def key(point: tuple[float, ...]) -> str:
        return "/".join(f"{v:g}" for v in point)

    for point in grid:
        per_cell: dict[str, Any] = {}
        setting = dict(zip(names, point, strict=True))
        for sp, cname, cap in cells:
            cfg = FleetConfig(num_workers=args.workers, policy="kv",
                              weights=SchedulerWeights(**setting),
                              engine=EngineConfig(block_size=args.block_size, kv_capacity_tokens=cap))
            rep = FleetSimulator(profile, cfg).run(prepare(trace, args.block_size, sp, hashes)).report
            per_cell[f"{sp:g}x/{cname}"] = {"mean_ttft_ms": rep.ttft_ms["mean"],
                                            "p99_ttft_ms": rep.ttft_ms["p99"], "hit_rate": rep.hit_rate}
            done += 1
            progress(done, total, "tune_weights")
        runs[key(point)] = {**setting, "cells": per_cell}

    base = runs[key(default)]["cells"]
    for r in runs.values():
        ratios = [c["mean_ttft_ms"] / base[k]["mean_ttft_ms"] for k, c in r["cells"].items()]
        r["ttft_vs_default_geomean"] = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        r["mean_hit_rate"] = sum(c["hit_rate"] for c in r["cells"].values()) / len(r["cells"])
    ranked = sorted(runs.values(), key=lambda r: r["ttft_vs_default_geomean"])
    print(table([[*(r[n] for n in names), r["ttft_vs_default_geomean"], r["mean_hit_rate"]]
                 for r in ranked], [*names, "ttft/default (geomean)", "hit"]))
    write_json(args.json, {
        "benchmark": "tune_weights", "machine": machine(), "trace": str(args.trace.name),
        "requests": len(trace), "workers": args.workers, "speedups": speedups,
        "capacities_tokens": capacities, "defaults_at_run": dict(DEFAULT_WEIGHTS),
        "grid": args.grid,
        "best": {k: ranked[0][k] for k in (*names, "ttft_vs_default_geomean", "mean_hit_rate")},
        "runs": runs, "wall_s": time.perf_counter() - t0,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
