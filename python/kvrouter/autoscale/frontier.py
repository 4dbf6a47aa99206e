"""`kvrouter frontier`: the Pareto sweep of bench/disagg for one calibration and workload.

Every fleet of `--gpus` GPUs (aggregated; each prefill:decode split; for the mixed
workload, the specialised pools) is swept over closed-loop concurrency in the fleet
simulator (bench/disagg's `sweep_fleet`: the ladder stops at the knee, which is bisected).
Writes the points and frontiers as JSON, a table (text), and the plot of output
tokens/s per GPU against tokens/s per user, with the split the autoscaling planner would
choose for this workload marked on it (its `PerfModel` at the load that fills the fleet).

The sweep code is bench/disagg's (one implementation), so the command needs a
repository checkout with the `bench` extra: bench/ is not part of the installed package,
and the command says so (FrontierError) before anything runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from kvrouter.autoscale.config import SLO, AutoscaleConfig
from kvrouter.autoscale.sizing import Load, PerfModel


class FrontierError(RuntimeError):
    pass


# The checkout this module runs from (python/kvrouter/autoscale/frontier.py); in an installed
# package this is site-packages' parent, which has no bench/.
CHECKOUT = Path(__file__).resolve().parents[3]


def _bench_disagg(root: Path = CHECKOUT) -> ModuleType:
    """bench/disagg.py of the checkout at `root`, with what the command needs to import it
    (its sweep, bench.common, and matplotlib for the plot) checked before the sweep runs."""
    if not (root / "bench" / "disagg.py").exists():
        raise FrontierError(
            f"kvrouter frontier runs the sweep of bench/disagg.py, which is not part of the "
            f"installed package (no {root / 'bench' / 'disagg.py'}): run it from a kvrouter "
            f"repository checkout installed with `pip install -e '.[bench]'`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("bench.disagg")
        importlib.import_module("matplotlib")  # the plot: fail before a long sweep, not after
    except ImportError as e:
        raise FrontierError(
            f"kvrouter frontier cannot import bench/disagg.py from {root} ({e}); install the "
            f"bench extra in that checkout: pip install -e '.[bench]'") from None
    return module


def register(sub: Any) -> None:
    p = sub.add_parser("frontier", help="Pareto sweep: tokens/s per GPU vs per user",
                       description=__doc__)
    p.add_argument("--calibration", type=Path, default=None,
                   help="engine calibration file (default: the sim engine's)")
    p.add_argument("--workload", default="mixed",
                   help="a bench/disagg workload: short_in_long_out, 3k_150, 8k_300, 32k_200, "
                        "mixed")
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--splits", default="",
                   help="prefill GPUs of the disaggregated fleets, comma-separated "
                        "(default: every one; --quick: every other)")
    p.add_argument("--max-users", type=int, default=8192, help="top of the concurrency ladder")
    p.add_argument("--quick", action="store_true", help="coarser ladders")
    p.add_argument("--jobs", type=int, default=1, help="fleets simulated in parallel")
    p.add_argument("--link-gbps", type=float, default=50.0)
    p.add_argument("--itl", type=float, default=SLO().itl_s,
                   help="the planner's ITL SLO for its marked split")
    p.add_argument("--out", type=Path, default=Path("frontier"), help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)


def planner_split(perf: PerfModel, load_tokens: tuple[float, float], gpus: int,
                  itl_s: float) -> tuple[int, int]:
    """The autoscaler's prefill:decode split for this workload when it needs `gpus` GPUs:
    its need at the arrival rate that fills the fleet (bisected on the rate)."""
    cfg = AutoscaleConfig(slo=SLO(ttft_s=60.0, itl_s=itl_s), max_workers=max(gpus, 2))
    prompt, output = load_tokens
    lo, hi = 0.0, 1.0
    while (n := perf.need(Load(hi, prompt, output), cfg)).prefill + n.decode <= gpus:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            break
    for _ in range(40):
        mid = (lo + hi) / 2
        n = perf.need(Load(mid, prompt, output), cfg)
        if n.prefill + n.decode <= gpus:
            lo = mid
        else:
            hi = mid
    n = perf.need(Load(lo, prompt, output), cfg)
    p = min(gpus - 1, max(1, n.prefill))
    return p, gpus - p


def _cmd(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (FrontierError, ValueError, OSError) as e:
        print(f"kvrouter frontier: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from kvrouter.engines.sim.engine import EngineConfig
    from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile

    d = _bench_disagg()
    if args.workload not in d.WORKLOADS:
        raise ValueError(f"unknown workload {args.workload!r}; known: {', '.join(d.WORKLOADS)}")
    if args.gpus < 2 or args.jobs < 1 or not args.link_gbps > 0:
        raise ValueError("--gpus must be >= 2, --jobs >= 1, --link-gbps > 0")
    cal = str(args.calibration or DEFAULT_CALIBRATION)
    profile = EngineProfile.load(cal)
    sw = d.sweeps(args.quick)
    sw["users"] = [u for u in sw["users"] if u <= args.max_users] or sw["users"][:1]
    splits = ([int(x) for x in args.splits.split(",") if x.strip()] if args.splits
              else list(range(1, args.gpus, 2 if args.quick else 1)))
    if any(not 0 < p < args.gpus for p in splits):
        raise ValueError(f"--splits must be in 1..{args.gpus - 1}")
    name, gpus = args.workload, args.gpus
    tasks = [d.FleetTask(name, "aggregated", f"{gpus}A/c{c}", tuple(d.agg_fleet(gpus)),
                         "aggregated", c) for c in sw["agg_chunks"]]
    tasks += [d.FleetTask(name, "disaggregated", f"{p}P:{gpus - p}D",
                          tuple(d.disagg_fleet(p, gpus - p)), "disaggregated", d.DISAGG_CHUNK)
              for p in splits]
    if name == "mixed" and gpus == d.GPUS:
        tasks += [d.FleetTask(name, "specialised", f"{a}A+{p}P:{q}D+{lp}LP:{ld}LD",
                              tuple(d.spec_fleet(a, p, q, lp, ld)), "auto", d.DISAGG_CHUNK)
                  for a, p, q, lp, ld in sw["spec"]]
    slos = {name: d.slo_by_class(profile, d.WORKLOADS[name])}
    fn = functools.partial(d._sweep_task, profile_path=cal, sw=sw, link_gbps=args.link_gbps,
                           seed=args.seed, slos=slos)
    t0 = time.perf_counter()
    done = d.run_tasks(tasks, args.jobs, fn)  # one progress line per fleet on stderr
    points: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        for pt in done[t]:
            points.setdefault(t.mode, []).append({**pt, "label": t.label})
    classes = d.WORKLOADS[name]
    mean_in = sum(c.input_tokens for c in classes) / len(classes)
    mean_out = sum(c.output_tokens for c in classes) / len(classes)
    perf = PerfModel(profile, EngineConfig(max_num_batched_tokens=d.DISAGG_CHUNK,
                                           max_num_seqs=d.MAX_NUM_SEQS))
    chosen = planner_split(perf, (mean_in, mean_out), gpus, args.itl)
    slo = slos[name]
    fronts = {m: d.frontier(pts, slo=slo) for m, pts in points.items()}
    result = {"workload": name, "calibration": cal, "gpus": gpus, "quick": args.quick,
              "ttft_slo_p90_s": slo, "planner_split": {"prefill": chosen[0], "decode": chosen[1],
                                                       "itl_slo_s": args.itl},
              "points": points,
              "frontier": {m: [{"tok_s_user": x, "tok_s_gpu": y} for x, y in f]
                           for m, f in fronts.items()},
              "wall_s": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    label = f"{chosen[0]}P:{chosen[1]}D"
    rows = [(m, pt["label"], pt["users"], pt["itl_tok_s_user"], pt["tok_s_gpu"],
             "yes" if d.meets_slo(pt, slo) else "no", "*" if pt["label"] == label else "")
            for m, pts in points.items() for pt in pts]
    from bench.common import table

    text = table(rows, ["mode", "fleet", "users", "tok/s/user", "tok/s/GPU", "SLO", "planner"])
    (args.out / "frontier.txt").write_text(text + "\n")
    _plot(result, label, slo, d, args.out / "frontier.png")
    print(text)
    print(f"planner's split for {name} on {gpus} GPUs: {label}; "
          f"wrote {args.out}/frontier.{{json,txt,png}}")
    return 0


def _plot(result: dict[str, Any], label: str, slo: dict[str, float], d: ModuleType,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"aggregated": "tab:blue", "disaggregated": "tab:orange", "specialised": "tab:green"}
    for mode, pts in result["points"].items():
        ok = [p for p in pts if d.meets_slo(p, slo)]
        ax.scatter([p["itl_tok_s_user"] for p in ok], [p["tok_s_gpu"] for p in ok], s=10,
                   alpha=0.35, color=colors.get(mode, "grey"))
        f = result["frontier"][mode]
        ax.step([q["tok_s_user"] for q in f], [q["tok_s_gpu"] for q in f], where="pre",
                marker="o", markersize=3, color=colors.get(mode, "grey"), label=mode)
    mine = [p for p in result["points"].get("disaggregated", []) if p["label"] == label
            and d.meets_slo(p, slo)]
    if mine:
        ax.scatter([p["itl_tok_s_user"] for p in mine], [p["tok_s_gpu"] for p in mine],
                   marker="*", s=140, color="black", zorder=5,
                   label=f"planner's split {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (1/ITL); runs meeting the TTFT SLO")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title(f"{result['workload']}, {result['gpus']} GPUs "
                 f"({Path(result['calibration']).stem})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


