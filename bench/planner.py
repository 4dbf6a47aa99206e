"""The autoscaling planner against static prefill:decode splits on a shifting Azure mix.

Claim (f): a static prefill:decode ratio degrades as the input/output mix shifts; the
planner (`kvrouter.autoscale`, the code `kvrouter planner` runs) holds the SLO with fewer
GPU-hours. Everything runs in the fleet simulator's open-loop mode with workers that
start, drain, stop and flip during the replay (`kvrouter.fleet.dynamic`): simulated
engines of a Llama-49B shape on H200 (../shared/calibration), the router's own Rust
scheduler and request planner (`mode=auto` with local prefill off: the specialiser sends
its short requests to aggregated workers when there are any, and every other prompt is
prefilled remotely, so the split is what is measured).

Workload: the Azure 2023 code trace (long prompts, ~28 output tokens: prefill-heavy)
and conversation trace (shorter prompts, ~211 output tokens: decode-heavy), each
replicated `--scale` times, every copy but the first rotated by a random offset within
the hour (another population of users: the trace's own bursts, not in step), lengths as
in the trace. The two are crossfaded (`keep_share`): code alone for the first 25% of
the run, fading out by 35%, a quiet spell (5% of each) to 65%, conversation fading in by
75% and alone to the end: a busy prefill-heavy morning, a quiet midday, a busy
decode-heavier evening, compressed into the trace's hour. The GPU-hours saved against
peak provisioning depend on that shape (its peak-to-average load is in the JSON); the
split the fleet needs moves with the mix. `--minutes` replays a shorter span (the
crossfade is stretched over it).

Runs, compared on the same requests:
* planner: starts at the perf model's size for the first minute's load (with the
  planner's headroom), ticks every
  30 s (cold start 60 s, role flip 5 s); it sizes prefill, decode and aggregated workers
  (an aggregated pool for the specialiser's short requests when that layout needs fewer
  GPUs; `layouts` in each tick: the GPUs each layout needed);
* static_peak: provisioning for the peak: per role, the perf model's need for the
  busiest minute (with the planner's headroom), fixed for the whole run; the cheaper of
  the two layouts (prefill/decode only, or short requests on aggregated workers);
* best_static: every prefill:decode split of round(planner GPU-hours / T) GPUs (equal
  GPU-hours), fixed; the best SLO attainment is reported.

A request is within SLO when TTFT <= --ttft and its mean inter-token latency <= --itl.
Keys: planner.slo_attainment, planner.gpu_hours, static_peak.gpu_hours,
best_static.slo_attainment (and the rest of each run). Timings are simulated, so the
machine only changes the wall time.

    python -m bench.planner --quick --json bench/results/planner-quick.json
    python -m bench.planner --json bench/results/planner.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, SHARED, machine, table, write_json
from kvrouter.autoscale import SLO, AutoscaleConfig, Autoscaler, Load, PerfModel
from kvrouter.autoscale.sim import SimDriver, within_slo
from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.fleet.dynamic import DynamicFleet
from kvrouter.fleet.simulator import FleetConfig, FleetRequest
from kvrouter.fleet.traces import load_azure
from kvrouter.planner import LengthSpecialiser, RequestClass
from kvrouter.registry import Role

CALIBRATION = SHARED / "calibration" / "h200-llama-49b-shape.json"
TICK_S = 30.0
TROUGH = 0.05
# The bench's SLO for a 49B model on H200: first token within 2 s (a 7K-token code prompt
# alone takes 1.2 s), 40 ms between tokens (a decode step alone takes 26 ms).
TTFT_S, ITL_S = 2.0, 0.04


def workload(scale: int, minutes: float | None, block_size: int, seed: int = 0
             ) -> list[FleetRequest]:
    rng = np.random.default_rng(seed)
    azure = SHARED / "traces" / "azure"
    traces = {"code": load_azure(azure / "AzureLLMInferenceTrace_code.csv"),
              "conv": load_azure(azure / "AzureLLMInferenceTrace_conv.csv")}
    span = minutes * 60 if minutes else max(t.requests[-1].arrival_s for t in traces.values())
    out: list[FleetRequest] = []
    for name, tr in traces.items():
        length = tr.requests[-1].arrival_s + 1.0
        for copy in range(scale):
            # each copy is another population of users: its own offset into the hour
            shift = 0.0 if copy == 0 else rng.uniform(0, length)
            for i, r in enumerate(tr.requests):
                t = (r.arrival_s + shift) % length
                if t >= span:
                    continue
                if rng.random() >= keep_share(name, t / span):
                    continue
                n = r.input_length // block_size
                hashes = [int(h) for h in rng.integers(1, 2**63, n, dtype=np.int64)]
                out.append(FleetRequest(f"{name}{copy}-{i}", t, r.input_length,
                                        r.output_length, hashes))
    out.sort(key=lambda r: r.arrival_s)
    return out


def keep_share(trace: str, f: float) -> float:
    """Share of a trace's requests kept at fraction f of the run: code alone for the first
    25%, fading out by 35%; a quiet spell (5% of each) to 65%; conversation fading in by
    75%, alone to the end."""
    if trace == "code":
        return 1.0 if f < 0.25 else max(TROUGH, 1.0 - (f - 0.25) / 0.1)
    return TROUGH if f < 0.65 else min(1.0, TROUGH + (f - 0.65) / 0.1)


# the router's request classes (mode auto): short requests go to aggregated workers
DISAGG = DisaggConfig(mode="auto", local_prefill_max_tokens=0)
SPECIALISER = LengthSpecialiser(DISAGG.specialisation)


def is_short(r: FleetRequest) -> bool:
    return SPECIALISER.classify(r.prompt_tokens, r.output_tokens) is RequestClass.SHORT


def _load(w: Sequence[FleetRequest], window_s: float) -> Load:
    if not w:
        return Load(0.0, 0.0, 0.0)
    return Load(len(w) / window_s, float(np.mean([r.prompt_tokens for r in w])),
                float(np.mean([r.output_tokens for r in w])))


def window_loads(reqs: Sequence[FleetRequest], window_s: float) -> list[tuple[Load, Load, Load]]:
    """(all, short class, the rest) load of each busy window (rate, mean lengths)."""
    end = reqs[-1].arrival_s
    loads = []
    for k in range(math.ceil(end / window_s)):
        w = [r for r in reqs if k * window_s <= r.arrival_s < (k + 1) * window_s]
        if w:
            short = [r for r in w if is_short(r)]
            rest = [r for r in w if not is_short(r)]
            loads.append((_load(w, window_s), _load(short, window_s), _load(rest, window_s)))
    return loads


def peak_fleet(perf: PerfModel, cfg: AutoscaleConfig,
               loads: Sequence[tuple[Load, Load, Load]]) -> tuple[int, int, int]:
    """Static provisioning for the peak (prefill, decode, aggregated): per role the most
    any minute needs (the planner's headroom, its minimums), in the cheaper layout."""
    def up(ld: Load) -> Load:
        return Load(ld.rate * (1 + cfg.headroom), ld.prompt_tokens, ld.output_tokens)

    single = [perf.need(up(a), cfg) for a, _, _ in loads]
    disagg = (max(cfg.min_prefill, *(n.prefill for n in single)),
              max(cfg.min_decode, *(n.decode for n in single)), 0)
    agg = [perf.need_aggregated(up(s), cfg) for _, s, _ in loads]
    rest = [perf.need(up(r), cfg) for _, _, r in loads]
    if not cfg.aggregated or not all(n.feasible for n in (*agg, *rest)):
        return disagg
    mixed = (max(cfg.min_prefill, *(n.prefill for n in rest)),
             max(cfg.min_decode, *(n.decode for n in rest)), max(n.aggregated for n in agg))
    return mixed if sum(mixed) < sum(disagg) else disagg


def run(profile: EngineProfile, engine: EngineConfig, reqs: Sequence[FleetRequest],
        cfg: AutoscaleConfig, initial: Sequence[Role], autoscaler: Autoscaler | None,
        max_workers: int, label: str) -> dict[str, Any]:
    fleet = DynamicFleet(profile, FleetConfig(engine=engine), max_workers, initial,
                         disagg=DISAGG, mode=DISAGG.mode, start_s=cfg.start_s, flip_s=cfg.flip_s)
    driver = SimDriver(reqs, autoscaler, specialiser=SPECIALISER)
    t0 = time.perf_counter()
    done = fleet.run_open_loop(reqs, TICK_S, driver.on_tick)
    wall = time.perf_counter() - t0
    ok = [within_slo(d, cfg.slo.ttft_s, cfg.slo.itl_s) for d in done]
    ttft = np.array([d.first_token - d.arrival for d in done])
    itl = np.array([(d.finish - d.first_token) / (d.output_tokens - 1) for d in done
                    if d.output_tokens > 1])
    sys.stderr.write(f"{label}: {len(done)} requests, {fleet.gpu_s / 3600:.2f} GPU-h, "
                     f"SLO {np.mean(ok):.3f}, wall {wall:.0f}s\n")
    return {
        "label": label, "requests": len(done), "slo_attainment": float(np.mean(ok)),
        "ttft_ok": float(np.mean(ttft <= cfg.slo.ttft_s)),
        "itl_ok": float(np.mean(itl <= cfg.slo.itl_s)) if len(itl) else 1.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
        "gpu_hours": fleet.gpu_s / 3600, "initial": [r.value for r in initial],
        "actions": len(fleet.events), "flips": sum(1 for e in fleet.events
                                                  if e[1].startswith("flip")),
        "actuator_failures": driver.failures, "wall_s": wall,
        "paths": {p: sum(1 for d in done if d.path == p) for p in sorted({d.path for d in done})},
        "ticks": [asdict(t) for t in driver.ticks],
        "slo_by_tick": _slo_by_tick(done, cfg),
    }


def _slo_by_tick(done: Sequence[Any], cfg: AutoscaleConfig) -> list[tuple[float, float]]:
    by: dict[int, list[bool]] = {}
    for d in done:
        by.setdefault(int(d.arrival // TICK_S), []).append(
            within_slo(d, cfg.slo.ttft_s, cfg.slo.itl_s))
    return [((k + 1) * TICK_S, float(np.mean(v))) for k, v in sorted(by.items())]


def _peak_to_average(loads: Sequence[tuple[Load, Load, Load]]) -> float:
    """Busiest minute over the mean, in prompt tokens per second (the prefill work)."""
    work = [ld.rate * ld.prompt_tokens for ld, _, _ in loads]
    return max(work) / (sum(work) / len(work)) if work else 0.0


def _aggregated_summary(ticks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the planner used aggregated workers, and what each layout needed (GPUs)."""
    sized = [t for t in ticks if "with_aggregated" in t.get("layouts", {})]
    cheaper = [t for t in sized if t["layouts"]["with_aggregated"] < t["layouts"]["disaggregated"]]
    return {
        "ticks": len(ticks),
        "ticks_with_aggregated_workers": sum(1 for t in ticks if t.get("aggregated", 0) > 0),
        "max_aggregated_workers": max((t.get("aggregated", 0) for t in ticks), default=0),
        "ticks_mixed_layout_sized": len(sized),
        "ticks_mixed_layout_cheaper": len(cheaper),
        "median_gpus_disaggregated_layout": float(np.median(
            [t["layouts"]["disaggregated"] for t in sized])) if sized else None,
        "median_gpus_mixed_layout": float(np.median(
            [t["layouts"]["with_aggregated"] for t in sized])) if sized else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    pl = result["planner"]
    ticks = pl["ticks"]
    t = [x["t"] / 60 for x in ticks]
    axes[0].plot(t, [x["rate"] for x in ticks], color="black")
    axes[0].set_ylabel("arrivals / s")
    axes[0].set_title("load (code -> conversation crossfade)")
    axes[1].step(t, [x["prefill"] for x in ticks], where="post", label="planner prefill")
    axes[1].step(t, [x["decode"] for x in ticks], where="post", label="planner decode")
    axes[1].step(t, [x.get("aggregated", 0) for x in ticks], where="post", color="C2",
                 label="planner aggregated")
    bs = result["best_static"]
    axes[1].axhline(bs["prefill"], ls="--", color="C0", alpha=0.6,
                    label=f"best static prefill ({bs['prefill']})")
    axes[1].axhline(bs["decode"], ls="--", color="C1", alpha=0.6,
                    label=f"best static decode ({bs['decode']})")
    axes[1].set_ylabel("workers (GPUs)")
    axes[1].legend(fontsize=8, loc="upper left")
    for key, style in (("planner", "-"), ("best_static", "--"), ("static_peak", ":")):
        s = result[key]["slo_by_tick"]
        axes[2].plot([x[0] / 60 for x in s], [x[1] for x in s], style,
                     label=f"{key} ({result[key]['slo_attainment']:.3f}, "
                           f"{result[key]['gpu_hours']:.1f} GPU-h)")
    axes[2].set_ylabel("share within SLO")
    axes[2].set_xlabel("minutes")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="5 copies of each trace (up to ~20 GPUs), 5 static splits")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--scale", type=int, default=None,
                    help="copies of each trace (default 5 quick, 8 full)")
    ap.add_argument("--ttft", type=float, default=TTFT_S)
    ap.add_argument("--itl", type=float, default=ITL_S)
    ap.add_argument("--calibration", type=Path, default=CALIBRATION)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    minutes = args.minutes
    scale = args.scale or (5 if args.quick else 8)
    profile = EngineProfile.load(args.calibration)
    engine = EngineConfig()
    cfg = AutoscaleConfig(slo=SLO(ttft_s=args.ttft, itl_s=args.itl), interval_s=TICK_S)
    perf = PerfModel(profile, engine)
    reqs = workload(scale, minutes, engine.block_size)
    span = reqs[-1].arrival_s
    sys.stderr.write(f"{len(reqs)} requests over {span / 60:.1f} min\n")
    # the peak as the planner would size it: each minute's load with the same headroom
    loads = window_loads(reqs, 60.0)
    needs = [perf.need(Load(ld.rate * (1 + cfg.headroom), ld.prompt_tokens, ld.output_tokens),
                       cfg) for ld, _, _ in loads]
    peak_p, peak_d, peak_a = peak_fleet(perf, cfg, loads)
    # a warm start, like the static fleets: sized for the busiest of the first 5 minutes
    first = max(needs[:5], key=lambda n: (n.prefill + n.decode, n.prefill))
    initial = [Role.PREFILL] * max(1, first.prefill) + [Role.DECODE] * max(1, first.decode)
    max_workers = max(cfg.max_workers, peak_p + peak_d + peak_a + 4,
                      max(n.prefill + n.decode for n in needs) + 4)
    cfg = cfg.model_copy(update={"max_workers": max_workers})

    scaler = Autoscaler(perf, cfg)
    planner = run(profile, engine, reqs, cfg, initial, scaler, max_workers, "planner")
    peak = run(profile, engine, reqs, cfg, [Role.PREFILL] * peak_p + [Role.DECODE] * peak_d
               + [Role.AGGREGATED] * peak_a, None, max_workers, "static_peak")
    peak.update(prefill=peak_p, decode=peak_d, aggregated=peak_a)
    hours = span / 3600
    gpus = max(2, round(planner["gpu_hours"] / hours))
    ratio = sum(n.prefill_exact for n in needs) / max(
        1e-9, sum(n.prefill_exact + n.decode_exact for n in needs))
    centre = min(gpus - 1, max(1, round(gpus * ratio)))
    width = 2 if args.quick else 4
    splits = sorted({p for p in range(centre - width, centre + width + 1) if 1 <= p < gpus})
    statics = []
    for p in splits:
        r = run(profile, engine, reqs, cfg, [Role.PREFILL] * p + [Role.DECODE] * (gpus - p),
                None, max_workers, f"static {p}:{gpus - p}")
        r.update(prefill=p, decode=gpus - p)
        statics.append(r)
    best = max(statics, key=lambda r: r["slo_attainment"])
    result: dict[str, Any] = {
        "machine": machine(), "quick": args.quick, "scale": scale,
        "minutes": span / 60, "requests": len(reqs), "calibration": str(args.calibration.name),
        "peak_to_average_load": _peak_to_average(loads),
        "slo": cfg.slo.model_dump(), "autoscale": cfg.model_dump(),
        "planner": planner, "static_peak": peak, "best_static": best,
        "static_splits": [{k: r[k] for k in ("prefill", "decode", "slo_attainment",
                                             "gpu_hours", "ttft_ok", "itl_ok")}
                          for r in statics],
        "ratios": {"planner_vs_peak_gpu_hours": planner["gpu_hours"] / peak["gpu_hours"]},
        "aggregated": _aggregated_summary(planner["ticks"]),
        "targets": {
            "slo_attainment_ge_0_95": planner["slo_attainment"] >= 0.95,
            "gpu_hours_le_0_7_peak": planner["gpu_hours"] <= 0.7 * peak["gpu_hours"],
            "beats_best_static": planner["slo_attainment"] > best["slo_attainment"],
        },
    }
    rows = [(r["label"], r.get("prefill", "-"), r.get("decode", "-"), r.get("aggregated", "-"),
             r["gpu_hours"], r["slo_attainment"], r["ttft_ok"], r["itl_ok"])
            for r in (planner, peak, *statics)]
    print(table(rows, ["run", "prefill", "decode", "aggregated", "GPU-h", "SLO", "TTFT ok",
                       "ITL ok"]))
    print(result["aggregated"])
    print(result["targets"])
    write_json(args.json, result)
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else
                              REPO / "bench" / "results" / "planner.png")
    plot(result, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
