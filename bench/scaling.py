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
* ``shared``: the router's n-sample path: placement by the cost function, one prefill
  and n forked decodes on the prefix holder (the engine's n), spread only when the
  holder's decode load makes another holder cheaper;
* ``big``: one query of the 49B shape (n = 1).

Each is run aggregated (every GPU a whole-request worker) and disaggregated (one prefill
GPU, the rest decode; the planner's conditional disaggregation decides per request).
Reported: GPU-seconds per answer (engine busy time summed over GPUs / answers), latency
per answer p50/p99, output tokens/s per GPU, for n = 1, 2, 4, 8 at one concurrency, and
the runtime-per-answer against concurrency plot (n = 4; three lines, each with and
without disaggregation).

Part 2 (``--vllm``): the two real vLLM CPU servers of kvrouter.testing.vllm_harness:
n = 4 through Router.Generate against 4 parallel and 4 sequential client calls (wall
time, vLLM's prefix-cache hits from its /metrics).
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
from kvrouter.server.nsample import place_samples, sample_reservation

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
                 block_size: int = 64) -> None:
        self.bs = block_size
        self.index = PrefixIndex(block_size)
        self.sched = Scheduler(self.index, seed=seed, lease_s=1e12)
        self.cfg = ModelConfig(name="bench", block_size=block_size)
        self.planner = Planner(self.sched, DisaggConfig(), block_size=block_size,
                               prefill_weight=self.cfg.weights.prefill)
        ecfg = EngineConfig(block_size=block_size)
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

    # -- one request through the planner (client and independent ways, sample 0) --------
    def request(self, prompt: Prompt, rid: str, out: int, t: float,
                done: Callable[[float, int], None], forks: int = 0) -> None:
        """Plan and run one request; with `forks`, that many more samples fork from it on
        its (decode) worker once its prompt KV is there (the engine's n). `done(t, k)` is
        called as each of its 1 + forks samples finishes."""
        plan = self.planner.plan(prompt, rid, out, self.pools)
        hashes = prompt.hashes or ()

        def generation(mode: RequestMode, t0: float) -> None:
            lead = SimRequest(rid, hashes, prompt.prompt_tokens, out, mode=mode)
            self.submit(plan.worker, lead, t0, rid, lambda te: done(te, 0))
            blocks = -(-out // self.bs)
            for i in range(1, forks + 1):
                res = sample_reservation(rid, i)
                self.sched.reserve(plan.worker, res, 0, blocks, now=t0)
                child = SimRequest(res, hashes, prompt.prompt_tokens, out, fork_of=lead)
                self.submit(plan.worker, child, t0, res, _bind(done, i))

        if plan.path is PlanPath.DISAGGREGATED:
            assert plan.prefill_worker is not None
            ctx = SimRequest(plan.prefill_request_id, hashes, prompt.prompt_tokens, 1,
                             mode=RequestMode.CONTEXT_ONLY)
            self.submit(plan.prefill_worker, ctx, t, plan.prefill_request_id,
                        lambda te: generation(RequestMode.GENERATION_ONLY, te))
        else:
            generation(RequestMode.BOTH, t)

    def shared_aggregated(self, prompt: Prompt, rid: str, n: int, out: int, t: float,
                          done: Callable[[float, int], None]) -> None:
        """The router's n-sample path on aggregated workers: nsample.place_samples, then per
        worker one request and forks of it."""
        cands = self.pools["aggregated"].aggregated
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
             profile: EngineProfile, gpus: int, disagg: bool, seed: int = 0) -> RunResult:
    """Closed loop: `concurrency` clients ask `questions` questions in all."""
    sim = ScalingSim(profile, gpus, disagg, seed)
    bs = sim.bs
    sys_blocks = wl.system_tokens // bs
    q_blocks = wl.prompt_tokens // bs - sys_blocks
    system = list(range(1, sys_blocks + 1))
    res = RunResult(gpus=gpus)
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
            elif disagg:
                sim.request(prompt, rid, wl.output_tokens, t0, sample_done, forks=n - 1)
            else:
                sim.shared_aggregated(prompt, rid, n, wl.output_tokens, t0, sample_done)

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
            r = simulate(way, 4, c, max(questions, 2 * c), wl, small, gpus, disagg)
            out["curve"].setdefault("disagg" if disagg else "agg", {}) \
                .setdefault(way, {})[str(c)] = r.row()
        else:
            r = simulate("shared", 1, ref_c, questions, wl, big, gpus, args)
            out.setdefault("big", {})["disagg" if args else "agg"] = r.row()
    progress(len(jobs), len(jobs), "scaling (simulated)")
    return out


def headline(sim: dict[str, Any]) -> dict[str, Any]:
    agg = sim["by_n"]["agg"]
    shared4, client4 = agg["shared"]["4"], agg["client"]["4"]
    big = sim["big"]["agg"]
    curve = sim["curve"]
    below = {mode: all(curve[mode]["shared"][c]["latency_ms"]["mean"]
                       <= curve[mode]["independent"][c]["latency_ms"]["mean"]
                       for c in curve[mode]["shared"]) for mode in curve}
    h = {"router_n4_gpu_s": shared4["gpu_s_per_answer"],
         "big_model_gpu_s": big["gpu_s_per_answer"],
         "router_n4_latency_ms": shared4["latency_ms"]["p50"],
         "client_n4_latency_ms": client4["latency_ms"]["p50"],
         "independent_n4_latency_ms": agg["independent"]["4"]["latency_ms"]["p50"],
         "big_model_latency_ms": big["latency_ms"]["p50"],
         "aware_below_unaware_at_every_concurrency": below}
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
        return asyncio.run(_vllm_ways(fleet, 4 if quick else 12))


async def _vllm_ways(fleet: Any, questions: int) -> dict[str, Any]:
    import grpc

    from bench.real_vllm import reset_caches
    from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
    from kvrouter.testing.vllm_harness import MODEL_NAME, VOCAB_SIZE, scrape_prefix_cache
    from kvrouter.testing.wait import wait_stable

    rng = random.Random(0)
    # 64 shared + 80 unique tokens: 4 full blocks of 32, so a sample that follows another
    # of its question can hit 128 tokens (vLLM never serves the block of the last token)
    system = [rng.randrange(4, VOCAB_SIZE) for _ in range(64)]
    prompts = [system + [rng.randrange(4, VOCAB_SIZE) for _ in range(80)]
               for _ in range(questions)]
    max_tokens = 16
    out: dict[str, Any] = {"questions": questions, "prompt_tokens": len(prompts[0]),
                           "max_tokens": max_tokens, "samples": 4}

    async def one(stub: Any, prompt: list[int], n: int) -> int:
        sp = common_pb2.SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0,
                                       ignore_eos=True)
        req = router_pb2.RouterGenerateRequest(model=MODEL_NAME, token_ids=prompt, sampling=sp)
        got = 0
        async for resp in stub.Generate(req, timeout=300):
            got += resp.finished
        return got

    for way in VLLM_WAYS:
        await reset_caches(fleet)
        before = {w.name: scrape_prefix_cache(w) for w in fleet.workers}
        walls: list[float] = []
        async with grpc.aio.insecure_channel(fleet.router_target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for p in prompts:
                t0 = time.perf_counter()
                if way == "router_n4":
                    done = await one(stub, p, 4)
                elif way == "parallel_4":
                    done = sum(await asyncio.gather(*(one(stub, p, 1) for _ in range(4))))
                else:
                    done = 0
                    for _ in range(4):
                        done += await one(stub, p, 1)
                if done != 4:
                    raise RuntimeError(f"{way}: {done} of 4 samples finished")
                walls.append(time.perf_counter() - t0)
        after = await asyncio.to_thread(
            wait_stable, lambda: {w.name: scrape_prefix_cache(w) for w in fleet.workers},
            0.5, 30, what="the engines' prefix-cache counters")
        hits = sum(after[n].hits - before[n].hits for n in after)
        queries = sum(after[n].queries - before[n].queries for n in after)
        out[way] = {"wall_ms": summary(np.asarray(walls) * 1e3), "prefix_hit_tokens": hits,
                    "prefix_query_tokens": queries,
                    "prefix_hit_rate": hits / queries if queries else 0.0}
        print(f"vLLM {way}: p50 {out[way]['wall_ms']['p50']:.0f} ms, hit rate "
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
