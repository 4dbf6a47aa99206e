"""Inference-time scaling at the router: n samples of a small model against one query of a
big one, and router-side fan-out against client round trips (docs/inference-scaling.md).

    python -m bench.scaling --quick --json /tmp/scaling.json
    python -m bench.scaling                       # full run -> bench/results/scaling.json

Part 1, simulated (H200 calibrations of the 8B and 49B shapes in ../shared/calibration):
simulated engines behind the router's own Rust Scheduler and PrefixIndex (fed with the
engines' KV events) and the product's placement code (kvrouter.planner,
kvrouter.server.nsample.place_samples), in simulated time, closed loop: C clients, each
asking its next question when the previous answer is complete. A question is a planning
prompt (a system prompt shared by every question + a unique part; short input, long
output). Ways to answer it with n samples of the 8B shape:

* ``client``: n client round trips, one after the other (each pays the client's RTT and
  is routed on its own: nothing tells the router they belong together);
* ``independent``: the router fans the n samples out as n independent requests (one
  RTT; each sample is routed and prefilled on its own);
* ``shared``: the router's n-sample path (nsample.run_samples): the pool an aggregated
  request gets (a disaggregated pool's decode workers, prefilling locally), placement
  by the cost function, one prefill and n forked decodes on the prefix holder (the
  engine's n), spread only when the holder's decode load makes another holder cheaper;
* ``big``: one query of the 49B shape (n = 1).

Each is run aggregated (every GPU a whole-request worker) and disaggregated (one prefill
GPU, the rest decode; the planner's conditional disaggregation decides per request).
Reported: GPU-seconds per answer (engine busy time summed over GPUs / answers), latency
per answer p50/p99, output tokens/s per GPU, for n = 1, 2, 4, 8 at one concurrency, and
the runtime-per-answer against concurrency plot (n = 4; three lines, each with and
without disaggregation); at one client, what one answer's runtime consists of per way
(``breakdown_c1``: wait + prefill, decode steps, batch, step time, KV read per step) and
the calibration's decode step costs (``step_facts``).

Part 2 (``--vllm``): the two real vLLM CPU servers of kvrouter.testing.vllm_harness:
n = 4 through Router.Generate against 4 parallel and 4 sequential client calls (wall
time, vLLM's prefix-cache hits from its /metrics), interleaved question by question.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, SHARED, machine, progress, summary, table, write_json
from kvrouter._core import PrefixIndex, Scheduler
from kvrouter.config import DisaggConfig, ModelConfig
from kvrouter.engines.sim.engine import EngineConfig, RequestMode, SimEngine, SimRequest
from kvrouter.engines.sim.profile import PROFILES_DIR, EngineProfile
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent
from kvrouter.fleet.simulator import Wakeups
from kvrouter.planner import Planner, PlanPath, Prompt, build_pools
from kvrouter.registry import Role
from kvrouter.server.nsample import place_samples

SMALL = "h200-llama3-8b-shape"
BIG = "h200-llama-49b-shape"
WAYS = ("client", "independent", "shared")
LABEL = {"client": "client round trips", "independent": "router-side, independent",
         "shared": "router-side, prefix-aware", "big": "49B, one query"}


def load_profile(name: str) -> EngineProfile:
    p = SHARED / "calibration" / f"{name}.json"
    return EngineProfile.load(p if p.exists() else PROFILES_DIR / f"{name}.json")


@dataclass(frozen=True)
class Workload:
    """A planning workload: short input, long output."""

    system_tokens: int = 512  # shared by every question
    question_tokens: int = 256  # unique per question
    output_tokens: int = 384
    rtt_s: float = 0.05  # the client's round trip to the router (one per call)

    @property
    def prompt_tokens(self) -> int:
        return self.system_tokens + self.question_tokens


@dataclass
class RunResult:
    latencies: list[float] = field(default_factory=list)
    gpu_s: float = 0.0
    makespan_s: float = 0.0
    output_tokens: int = 0
    gpus: int = 0
    prefill_tokens: int = 0
    sim: ScalingSim | None = None  # kept with record=True (breakdown)

    def row(self) -> dict[str, Any]:
        n = len(self.latencies)
        lat = summary(np.asarray(self.latencies) * 1e3)
        return {"answers": n, "gpu_s_per_answer": self.gpu_s / n if n else math.nan,
                "latency_ms": lat,
                "tokens_per_gpu_s": self.output_tokens / (self.makespan_s * self.gpus)
                if self.makespan_s > 0 else math.nan,
                "prefill_tokens_per_answer": self.prefill_tokens / n if n else math.nan}


def _bind(done: Callable[[float, int], None], k: int) -> Callable[[float], None]:
    return lambda te: done(te, k)


class ScalingSim:
    """Simulated engines behind the router's Scheduler and Planner, driven by C clients."""

    def __init__(self, profile: EngineProfile, gpus: int, disagg: bool, seed: int = 0,
                 block_size: int = 64, record: bool = False) -> None:
        self.bs = block_size
        self.profile = profile
        # with record: every engine request (worker, request) and the engines' step logs
        self.log: list[tuple[int, SimRequest]] | None = [] if record else None
        self.index = PrefixIndex(block_size)
        self.sched = Scheduler(self.index, seed=seed, lease_s=1e12)
        self.cfg = ModelConfig(name="bench", block_size=block_size)
        self.planner = Planner(self.sched, DisaggConfig(), block_size=block_size,
                               prefill_weight=self.cfg.weights.prefill)
        ecfg = EngineConfig(block_size=block_size, record_steps=record)
        self.engines = [SimEngine(profile, ecfg, name=f"w{i}") for i in range(gpus)]
        roles = [Role.AGGREGATED] * gpus
        if disagg:
            roles = [Role.PREFILL] + [Role.DECODE] * (gpus - 1)
        for w in range(gpus):
            self.sched.add_worker(w)
        self.pools = build_pools([(w, roles[w], None) for w in range(gpus)])
        self.disagg = disagg
        self.wakeups = Wakeups(self.engines)
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = 0
        # engine request -> what to do when it finishes (time) / its reservation id
        self._on_done: dict[int, Callable[[float], None]] = {}
        self._res: dict[int, str] = {}

    # -- plumbing -----------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[float], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def _apply(self, w: int, events: list[KvEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self.index.apply_stored(w, ev.hashes, ev.parent, router_hashes=ev.router_hashes)
            elif isinstance(ev, BlockRemoved):
                self.index.apply_removed(w, ev.hashes)
            elif isinstance(ev, AllCleared):
                self.index.clear_worker(w)

    def _sync(self, w: int, now: float) -> None:
        eng = self.engines[w]
        self._apply(w, eng.drain_kv_events())
        for u in eng.drain_updates():
            r = u.request
            res = self._res.get(id(r))
            if u.kind == "first_token" and res is not None:
                self.sched.mark_prefill_done(res, now=u.time)
            elif u.kind in ("finished", "rejected"):
                if res is not None:
                    self.sched.release(res)
                    del self._res[id(r)]
                done = self._on_done.pop(id(r), None)
                if done is not None:
                    done(u.time)
        rep = eng.load_report()
        self.sched.report_load(w, rep.running, rep.queued, rep.kv_used_blocks,
                               rep.kv_free_blocks, rep.queued_prefill_tokens, now=now)

    def submit(self, w: int, req: SimRequest, t: float, res: str | None,
               done: Callable[[float], None]) -> None:
        if res is not None:
            self._res[id(req)] = res
        self._on_done[id(req)] = done
        if self.log is not None:
            self.log.append((w, req))
        self.engines[w].submit(req, t)
        self._sync(w, t)
        self.wakeups.wake(w)

    def run(self) -> None:
        while True:
            tc = self._events[0][0] if self._events else math.inf
            due = self.wakeups.pop(tc, inclusive=False)
            if due is not None:
                t, w = due
                self.engines[w].run_until(t)
                self._sync(w, t)
                self.wakeups.wake(w)
                continue
            if not self._events:
                return
            t, _, fn = heapq.heappop(self._events)
            fn(t)

    # -- one request through the planner (client and independent ways) -------------------
    def request(self, prompt: Prompt, rid: str, out: int, t: float,
                done: Callable[[float, int], None]) -> None:
        """Plan and run one request (conditional disaggregation included); `done(t, 0)`
        when it finishes."""
        plan = self.planner.plan(prompt, rid, out, self.pools)
        hashes = prompt.hashes or ()

        def generation(mode: RequestMode, t0: float) -> None:
            lead = SimRequest(rid, hashes, prompt.prompt_tokens, out, mode=mode)
            self.submit(plan.worker, lead, t0, rid, lambda te: done(te, 0))

        if plan.path is PlanPath.DISAGGREGATED:
            assert plan.prefill_worker is not None
            ctx = SimRequest(plan.prefill_request_id, hashes, prompt.prompt_tokens, 1,
                             mode=RequestMode.CONTEXT_ONLY)
            self.submit(plan.prefill_worker, ctx, t, plan.prefill_request_id,
                        lambda te: generation(RequestMode.GENERATION_ONLY, te))
        else:
            generation(RequestMode.BOTH, t)

    def shared(self, prompt: Prompt, rid: str, n: int, out: int, t: float,
               done: Callable[[float, int], None]) -> None:
        """The router's n-sample path (nsample.run_samples): the pool chosen for an
        aggregated request (a disaggregated pool's decode workers, prefilling locally),
        nsample.place_samples over it, then per worker one request and forks of it."""
        name, _cls = self.planner.choose_pool(prompt.prompt_tokens, out, self.pools,
                                              "aggregated")
        pool = self.pools[name]
        cands = pool.aggregated or pool.decode
        pl = place_samples(self.planner, prompt, rid, n, out, cands, self.cfg, now=t)
        hashes = prompt.hashes or ()
        for _w, idxs in pl.groups.items():
            lead: SimRequest | None = None
            for i in idxs:
                req = SimRequest(pl.reservations[i], hashes, prompt.prompt_tokens, out,
                                 fork_of=lead)
                lead = lead or req
                self.submit(_w, req, t, pl.reservations[i], _bind(done, i))


def simulate(way: str, n: int, concurrency: int, questions: int, wl: Workload,
             profile: EngineProfile, gpus: int, disagg: bool, seed: int = 0,
             record: bool = False) -> RunResult:
    """Closed loop: `concurrency` clients ask `questions` questions in all."""
    sim = ScalingSim(profile, gpus, disagg, seed, record=record)
    bs = sim.bs
    sys_blocks = wl.system_tokens // bs
    q_blocks = wl.prompt_tokens // bs - sys_blocks
    system = list(range(1, sys_blocks + 1))
    res = RunResult(gpus=gpus, sim=sim if record else None)
    issued = 0

    def prompt_of(q: int) -> Prompt:
        base = 1_000_000 * (q + 1)
        return Prompt.from_hashes(system + [base + j for j in range(q_blocks)],
                                  wl.prompt_tokens)

    def ask(t: float) -> None:
        nonlocal issued
        if issued >= questions:
            return
        q = issued
        issued += 1
        t_ask = t
        prompt = prompt_of(q)
        rid = f"q{q}"
        left = [n]

        def answered(te: float) -> None:
            res.latencies.append(te - t_ask)
            sim.at(te, ask)  # this client's next question

        if way == "client":
            def call(k: int, tc: float) -> None:
                def one(te: float, _i: int) -> None:
                    if k + 1 < n:
                        sim.at(te + wl.rtt_s, lambda t2: call(k + 1, t2))
                    else:
                        answered(te + wl.rtt_s / 2)
                sim.request(prompt, f"{rid}.c{k}", wl.output_tokens, tc, one)
            sim.at(t + wl.rtt_s / 2, lambda t2: call(0, t2))
            return

        def sample_done(te: float, _i: int) -> None:
            left[0] -= 1
            if left[0] == 0:
                answered(te + wl.rtt_s / 2)

        def start(t0: float) -> None:
            if way == "independent" or n == 1:
                for k in range(n):
                    sim.request(prompt, f"{rid}.i{k}", wl.output_tokens, t0, sample_done)
            else:
                sim.shared(prompt, rid, n, wl.output_tokens, t0, sample_done)

        sim.at(t + wl.rtt_s / 2, start)

    for c in range(concurrency):
        sim.at(c * 1e-3, ask)  # staggered by a millisecond
    sim.run()
    res.gpu_s = sum(e.stats.busy_s for e in sim.engines)
    res.makespan_s = max(e.clock for e in sim.engines)
    res.output_tokens = sum(e.stats.decode_tokens for e in sim.engines)
    res.prefill_tokens = sum(e.stats.prefill_tokens for e in sim.engines)
    if len(res.latencies) != questions:
        raise RuntimeError(f"{way} n={n}: {len(res.latencies)} of {questions} answered")
    return res


def breakdown(res: RunResult, question: int, wl: Workload) -> dict[str, Any]:
    """What one answer's runtime consists of (a run with record=True): per engine request
    of the question, its worker, wait + prefill (arrival to first token; a
    generation-only request's KV transfer included), its decode steps with their mean
    batch and step time on that worker, and the KV it reads per step."""
    sim = res.sim
    assert sim is not None and sim.log is not None
    q = f"q{question}"
    kv = sim.profile.kv_bytes_per_token
    out: list[dict[str, Any]] = []
    computed = 0
    for w, r in sim.log:
        if not (r.request_id == q or r.request_id.startswith((q + ".", q + "#"))):
            continue
        if r.mode is not RequestMode.GENERATION_ONLY:
            computed += r.prompt_tokens - max(0, r.hit_blocks) * sim.bs
        if r.mode is RequestMode.CONTEXT_ONLY:
            continue
        assert r.first_token_time is not None and r.finish_time is not None
        t0, t1 = r.first_token_time, r.finish_time
        steps = [s for s in sim.engines[w].stats.step_log if t0 < s.end <= t1 + 1e-12]
        n_steps = sum(s.steps for s in steps)
        batch = sum(s.decodes * s.steps for s in steps) / n_steps if n_steps else 0.0
        ctx = r.prompt_tokens + wl.output_tokens / 2  # mean context over its decode
        out.append({"worker": w, "wait_and_prefill_ms": (t0 - r.arrival) * 1e3,
                    "decode_steps": n_steps, "mean_batch": batch,
                    "mean_step_ms": (t1 - t0) / n_steps * 1e3 if n_steps else 0.0,
                    "decode_ms": (t1 - t0) * 1e3,
                    "kv_read_mb_per_step": batch * ctx * kv / 1e6})
    return {"latency_ms": res.latencies[question] * 1e3, "rtt_ms": wl.rtt_s * 1e3,
            "workers": len({s["worker"] for s in out}), "prefill_tokens_computed": computed,
            "samples": out}


def step_facts(profile: EngineProfile, wl: Workload, n: int) -> dict[str, Any]:
    """The calibration's decode step at the workload's mean context for batch 1..n, with
    the prompt's KV read once per step for the batch (a shared-prefix attention kernel)
    instead of once per sample, and the KV bandwidth the decode points imply."""
    p, o = wl.prompt_tokens, wl.output_tokens
    steps = o - 1
    ctx = p + o / 2
    kv = profile.kv_bytes_per_token
    batch_ms = {str(b): profile.decode_time(b, ctx) * 1e3 for b in (1, 2, n)}
    shared_ms = {str(b): profile.decode_time(b, (p + b * o / 2) / b) * 1e3 for b in (2, n)}
    # KV bandwidth: extra decode time per extra KV byte between the two largest contexts
    # measured at the largest batch both have (the calibration's decode grid)
    grid: dict[int, dict[int, float]] = {}
    for r in profile.raw:
        if r.kind == "decode":
            grid.setdefault(r.batch, {})[r.context] = r.seconds
    bw: dict[str, float] = {}
    for b, by_ctx in sorted(grid.items()):
        if len(by_ctx) >= 2:
            c0, c1 = sorted(by_ctx)[:2]
            bw[str(b)] = b * (c1 - c0) * kv / (by_ctx[c1] - by_ctx[c0]) / 1e12
    return {"mean_context": ctx, "decode_steps": steps, "step_ms": batch_ms,
            "step_ms_prefix_read_once": shared_ms,
            "decode_ms": {b: v * steps for b, v in batch_ms.items()},
            "decode_ms_prefix_read_once": {b: v * steps for b, v in shared_ms.items()},
            "kv_tb_per_s_implied": bw,
            "prefill_ms": {"question_on_cached_system": profile.prefill_time(
                wl.question_tokens, wl.system_tokens) * 1e3,
                "whole_prompt": profile.prefill_time(p) * 1e3}}


def part_sim(quick: bool, gpus: int, wl: Workload) -> dict[str, Any]:
    small, big = load_profile(SMALL), load_profile(BIG)
    questions = 48 if quick else 256
    ref_c = 8 if quick else 16
    ns = (1, 2, 4, 8)
    conc = (1, 4, 8, 16, 32) if quick else (1, 2, 4, 8, 16, 32, 64)
    out: dict[str, Any] = {"questions": questions, "reference_concurrency": ref_c,
                           "gpus": gpus, "workload": wl.__dict__, "by_n": {}, "curve": {}}
    jobs: list[tuple[str, Any]] = []
    for disagg in (False, True):
        for n in ns:
            for way in WAYS:
                if n == 1 and way != "shared":
                    continue  # n = 1: the three ways are the same request
                jobs.append(("n", (way, n, disagg)))
        for way in WAYS:
            for c in conc:
                jobs.append(("c", (way, c, disagg)))
        jobs.append(("big", disagg))
    for i, (kind, args) in enumerate(jobs):
        progress(i, len(jobs), "scaling (simulated)")
        if kind == "n":
            way, n, disagg = args
            r = simulate(way, n, ref_c, questions, wl, small, gpus, disagg)
            out["by_n"].setdefault("disagg" if disagg else "agg", {}) \
                .setdefault(way if n > 1 else "n1", {})[str(n)] = r.row()
        elif kind == "c":
            way, c, disagg = args
            qs = max(questions, 2 * c)
            r = simulate(way, 4, c, qs, wl, small, gpus, disagg, record=c == 1)
            mode = "disagg" if disagg else "agg"
            out["curve"].setdefault(mode, {}).setdefault(way, {})[str(c)] = r.row()
            if c == 1:  # what one answer's runtime consists of (the last, in steady state)
                out.setdefault("breakdown_c1", {}).setdefault(mode, {})[way] = \
                    breakdown(r, qs - 1, wl)
        else:
            r = simulate("shared", 1, ref_c, questions, wl, big, gpus, args)
            out.setdefault("big", {})["disagg" if args else "agg"] = r.row()
    progress(len(jobs), len(jobs), "scaling (simulated)")
    out["step_facts"] = step_facts(small, wl, 4)
    return out


def headline(sim: dict[str, Any]) -> dict[str, Any]:
    agg = sim["by_n"]["agg"]
    shared4, client4 = agg["shared"]["4"], agg["client"]["4"]
    big = sim["big"]["agg"]
    curve = sim["curve"]
    # runtime per answer (mean), prefix-aware over independent, per concurrency; "below"
    # is strict (a tie is not below)
    ratio = {mode: {c: curve[mode]["shared"][c]["latency_ms"]["mean"]
                    / curve[mode]["independent"][c]["latency_ms"]["mean"]
                    for c in curve[mode]["shared"]} for mode in curve}
    below = {mode: all(v < 1.0 for v in ratio[mode].values()) for mode in curve}
    h = {"router_n4_gpu_s": shared4["gpu_s_per_answer"],
         "big_model_gpu_s": big["gpu_s_per_answer"],
         "router_n4_latency_ms": shared4["latency_ms"]["p50"],
         "client_n4_latency_ms": client4["latency_ms"]["p50"],
         "independent_n4_latency_ms": agg["independent"]["4"]["latency_ms"]["p50"],
         "big_model_latency_ms": big["latency_ms"]["p50"],
         "aware_below_unaware_at_every_concurrency": below,
         "aware_over_unaware_runtime": ratio}
    h["targets"] = {
        "router_n4_gpu_below_big": h["router_n4_gpu_s"] < h["big_model_gpu_s"],
        "router_n4_faster_than_client": h["router_n4_latency_ms"] < h["client_n4_latency_ms"],
        "aware_below_unaware": all(below.values())}
    return h


def plot(sim: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"client": "tab:red", "independent": "tab:orange", "shared": "tab:green"}
    for mode, style in (("agg", "-"), ("disagg", "--")):
        for way in WAYS:
            pts = sim["curve"][mode][way]
            cs = sorted(int(c) for c in pts)
            label = f"{LABEL[way]} ({'disaggregated' if mode == 'disagg' else 'aggregated'})"
            ax.plot(cs, [pts[str(c)]["latency_ms"]["mean"] / 1e3 for c in cs], style,
                    marker="o", color=colors[way], label=label)
            ax2.plot(cs, [pts[str(c)]["gpu_s_per_answer"] for c in cs], style, marker="o",
                     color=colors[way], label=label)
    wl = sim["workload"]
    ax.set_title(f"n = 4 samples of the 8B shape (H200 calibration, {sim['gpus']} GPUs, "
                 f"simulated)\nprompt {wl['system_tokens']}+{wl['question_tokens']} tokens, "
                 f"output {wl['output_tokens']}, client RTT {wl['rtt_s'] * 1e3:.0f} ms",
                 fontsize=9)
    ax.set_ylabel("runtime per answer, mean (s)")
    ax2.set_title("GPU time per answer (engine busy time summed over GPUs)", fontsize=9)
    ax2.set_ylabel("GPU-seconds per answer")
    ax2.set_yscale("log")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients")
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_sim(sim: dict[str, Any]) -> None:
    rows = []
    for mode, by_way in sim["by_n"].items():
        for way, by_n in by_way.items():
            for n, r in by_n.items():
                rows.append([mode, way, n, r["gpu_s_per_answer"], r["latency_ms"]["p50"],
                             r["latency_ms"]["p99"], r["tokens_per_gpu_s"],
                             r["prefill_tokens_per_answer"]])
    for mode, r in sim["big"].items():
        rows.append([mode, "big (49B)", 1, r["gpu_s_per_answer"], r["latency_ms"]["p50"],
                     r["latency_ms"]["p99"], r["tokens_per_gpu_s"],
                     r["prefill_tokens_per_answer"]])
    print(table(rows, ["mode", "way", "n", "GPU-s/answer", "p50 ms", "p99 ms",
                       "tok/s/GPU", "prefill tok/answer"]))
    rows = []
    for mode, by_way in sim.get("breakdown_c1", {}).items():
        for way, b in by_way.items():
            for s in b["samples"]:
                rows.append([mode, way, b["latency_ms"], s["worker"], s["wait_and_prefill_ms"],
                             s["decode_steps"], s["mean_batch"], s["mean_step_ms"],
                             s["kv_read_mb_per_step"]])
    print("one answer at 1 client (n = 4), per engine request:")
    print(table(rows, ["mode", "way", "answer ms", "worker", "wait+prefill ms", "steps",
                       "batch", "step ms", "KV MB/step"]))


# --------------------------------------------------------------------------- real vLLM


VLLM_WAYS = ("router_n4", "parallel_4", "sequential_4")


def run_vllm(quick: bool) -> dict[str, Any]:
    """Part 2: two vLLM CPU servers (kvrouter.testing.vllm_harness) behind `kvrouter serve`."""
    from kvrouter.testing.vllm_harness import VllmFleet, VllmFleetConfig, unavailable_reason

    why = unavailable_reason()
    if why is not None:
        print(f"vLLM part skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    # room for 4 samples of a question on one server (the harness default, 12 blocks,
    # is sized to force evictions in bench/real_vllm)
    with VllmFleet(VllmFleetConfig(num_gpu_blocks=64)) as fleet:
        return asyncio.run(_vllm_ways(fleet, 6 if quick else 24))


async def _vllm_ways(fleet: Any, questions: int) -> dict[str, Any]:
    """The three ways interleaved question by question (the order rotating), each way with
    questions of its own under the shared system prompt, so the machine's drift and the
    warm-up fall on all three alike; prefix hits are counted around each question."""
    import grpc

    from bench.real_vllm import reset_caches
    from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
    from kvrouter.testing.vllm_harness import MODEL_NAME, VOCAB_SIZE, scrape_prefix_cache
    from kvrouter.testing.wait import wait_stable

    rng = random.Random(0)
    # 64 shared + 80 unique tokens: 4 full blocks of 32, so a sample that follows another
    # of its question can hit 128 tokens (vLLM never serves the block of the last token)
    system = [rng.randrange(4, VOCAB_SIZE) for _ in range(64)]
    prompts = {way: [system + [rng.randrange(4, VOCAB_SIZE) for _ in range(80)]
                     for _ in range(questions)] for way in VLLM_WAYS}
    max_tokens = 16
    out: dict[str, Any] = {"questions": questions, "prompt_tokens": len(system) + 80,
                           "max_tokens": max_tokens, "samples": 4, "interleaved": True}

    async def one(stub: Any, prompt: list[int], n: int) -> int:
        sp = common_pb2.SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0,
                                       ignore_eos=True)
        req = router_pb2.RouterGenerateRequest(model=MODEL_NAME, token_ids=prompt, sampling=sp)
        got = 0
        async for resp in stub.Generate(req, timeout=300):
            got += resp.finished
        return got

    def counters() -> dict[str, Any]:
        return wait_stable(lambda: {w.name: scrape_prefix_cache(w) for w in fleet.workers},
                           0.3, 30, what="the engines' prefix-cache counters")

    await reset_caches(fleet)
    walls: dict[str, list[float]] = {w: [] for w in VLLM_WAYS}
    hits = dict.fromkeys(VLLM_WAYS, 0)
    queries = dict.fromkeys(VLLM_WAYS, 0)
    async with grpc.aio.insecure_channel(fleet.router_target) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        before = await asyncio.to_thread(counters)
        for q in range(questions):
            for k in range(len(VLLM_WAYS)):
                way = VLLM_WAYS[(q + k) % len(VLLM_WAYS)]
                p = prompts[way][q]
                t0 = time.perf_counter()
                if way == "router_n4":
                    done = await one(stub, p, 4)
                elif way == "parallel_4":
                    done = sum(await asyncio.gather(*(one(stub, p, 1) for _ in range(4))))
                else:
                    done = 0
                    for _ in range(4):
                        done += await one(stub, p, 1)
                walls[way].append(time.perf_counter() - t0)
                if done != 4:
                    raise RuntimeError(f"{way}: {done} of 4 samples finished")
                after = await asyncio.to_thread(counters)
                hits[way] += sum(after[n].hits - before[n].hits for n in after)
                queries[way] += sum(after[n].queries - before[n].queries for n in after)
                before = after
    for way in VLLM_WAYS:
        out[way] = {"wall_ms": summary(np.asarray(walls[way]) * 1e3),
                    "prefix_hit_tokens": hits[way], "prefix_query_tokens": queries[way],
                    "prefix_hit_rate": hits[way] / queries[way] if queries[way] else 0.0}
        print(f"vLLM {way}: p50 {out[way]['wall_ms']['p50']:.0f} ms, mean "
              f"{out[way]['wall_ms']['mean']:.0f} ms, hit rate "
              f"{out[way]['prefix_hit_rate']:.2f}", file=sys.stderr)
    out["headline"] = {f"vllm_{w}_wall_ms": out[w]["wall_ms"]["p50"] for w in VLLM_WAYS}
    out["headline"].update({f"vllm_{w}_hit_rate": out[w]["prefix_hit_rate"] for w in VLLM_WAYS})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer questions and concurrencies")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file (default: bench/results/scaling.json unless --quick)")
    ap.add_argument("--plot", type=Path, default=None,
                    help="PNG (default: beside the JSON, scaling_concurrency.png)")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="client round trip to the router")
    ap.add_argument("--vllm", action="store_true",
                    help="also run part 2 against two real vLLM CPU servers")
    a = ap.parse_args(argv)
    out_json = a.json or (None if a.quick else REPO / "bench" / "results" / "scaling.json")
    wl = Workload(rtt_s=a.rtt_ms / 1e3)
    sim = part_sim(a.quick, a.gpus, wl)
    result: dict[str, Any] = {"machine": machine(), "quick": a.quick, "simulated": sim}
    result["scaling"] = headline(sim)
    print_sim(sim)
    if a.vllm:
        result["vllm"] = run_vllm(a.quick)
        result["scaling"].update(result["vllm"].get("headline", {}))
    print({k: v for k, v in result["scaling"].items()})
    write_json(out_json, result)
    png = a.plot or (out_json.with_name("scaling_concurrency.png") if out_json else None)
    if png is not None:
        plot(sim, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
