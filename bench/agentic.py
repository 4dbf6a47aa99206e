"""Agentic sessions with tool pauses under GPU cache pressure: keep, offload, re-prefill.

Workload (built from public descriptions of coding / tool agents):

* SWE-agent (Yang et al., "SWE-agent: Agent-Computer Interfaces Enable Automated
  Software Engineering", arXiv:2405.15793): an agent turn is one model call that ends in
  one tool action (open/edit a file, run tests); trajectories run for tens of turns and
  the context grows by the tool's observation every turn; a shared system prompt and
  tool documentation head every session.
* InferCept (Abhyankar et al., "InferCept: Efficient Intercept Support for Augmented
  Large Language Model Inference", ICML 2024, arXiv:2402.01869): during a tool call
  ("interception") the engine can preserve the KV on the GPU, discard it and recompute,
  or swap it to host memory; interception times range from milliseconds (calculator)
  to seconds (code execution, web / QA tools) and tens of seconds (human, long tools).

So here: every session starts with a 1,024-token system prompt shared by all agents
and a task context of its own (issue text and files, ~5K tokens); every turn generates a
128-token tool call, then pauses for the tool (log-uniform 2-30 s) and appends its
observation (256-768 tokens) before the next turn. Sessions run `turns` turns, so the
resumed turns' contexts span ~6.5K-9.5K tokens (median ~8K, the issue's point).
Other traffic shares the GPU: Poisson requests over a set of shared 2K-token documents
(retrieval-style prompts, 64 output tokens) whose prefix hit rate shows what the idle
sessions' blocks cost everyone else.

Engine: the simulated engine core (kvrouter.engines.sim: the H100 Llama-3-8B-shape
calibration, 64-token blocks) with its host tier (host_tier.SessionKv: 54 GB/s
host-to-device, the calibration's measured copy bandwidth), the same code the live sim
engine serves Engine.Offload / Reload with. The GPU KV cache is cut to
`gpu_kv_tokens` so the sessions' contexts do not all fit (cache pressure).

Policies at every tool pause:

* keep: pin the session's blocks on the GPU for the pause (Offload target TIER_GPU);
* offload: copy to host and free the GPU blocks; Reload when the tool returns, the turn
  starts at once and the copy overlaps the new tokens' prefill layer by layer
  (SimRequest.load_until; no prefetch: what the copy does not hide is in the TTFT);
* offload_prefetch: the same, but the client calls Router.ResumeSession ahead of the
  tool's expected return (by twice the copy time), so the reload is done when it returns;
* reprefill: drop the session's blocks (freed at once) and prefill the context again;
* lru: do nothing (vLLM's default: the blocks stay evictable);
* auto: the router's cost comparison (kvrouter.server.sessions.decide) per pause.

Reported per policy: resumed-turn TTFT (time from the tool's return to the first token,
reload included) p50/p99, first-turn TTFT, the other traffic's prefix hit rate and
TTFT, and tokens/s per GPU: prompt plus generated tokens of every request (each
prompt counted once, however often it is recomputed) over the makespan. Simulated
time, deterministic for a seed: the figures do not depend on this machine's speed.

    python -m bench.agentic --quick --json bench/results/agentic-quick.json
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, summary, table, write_json
from kvrouter.engines.sim import DEFAULT_CALIBRATION, EngineConfig, EngineProfile, SimEngine
from kvrouter.engines.sim.engine import SimRequest
from kvrouter.engines.sim.host_tier import HostFull, SessionKv
from kvrouter.server.sessions import KvAction, decide, pause_costs

POLICIES = ("keep", "offload", "offload_prefetch", "reprefill", "lru", "auto")
BLOCK = 64


@dataclass(frozen=True)
class Workload:
    sessions: int = 48
    concurrent: int = 24  # sessions in flight at once (closed loop)
    turns: int = 6
    system_tokens: int = 1024
    task_tokens: tuple[int, int] = (4608, 5632)
    output_tokens: int = 128
    observation_tokens: tuple[int, int] = (256, 768)
    pause_s: tuple[float, float] = (2.0, 30.0)  # log-uniform
    other_rate: float = 4.0  # other requests per second
    other_docs: int = 24
    other_doc_tokens: int = 2048
    other_output: int = 64
    gpu_kv_tokens: int = 160_000
    host_kv_tokens: int = 1_000_000
    seed: int = 0


QUICK = Workload(sessions=24, concurrent=16, turns=6, gpu_kv_tokens=96_000)


@dataclass
class _Session:
    sid: int
    chain: list[int]  # block hashes of the whole (future) context
    pauses: list[float]
    observations: list[int]
    context: int
    turn: int = 0


@dataclass
class Result:
    resumed_ttft: list[float] = field(default_factory=list)
    resumed_context: list[int] = field(default_factory=list)
    first_ttft: list[float] = field(default_factory=list)
    other_ttft: list[float] = field(default_factory=list)
    other_prompt: int = 0
    other_hit: int = 0
    useful_tokens: int = 0
    makespan: float = 0.0
    actions: dict[str, int] = field(default_factory=dict)
    reload_blocks: int = 0
    stalls: int = 0


def run(policy: str, w: Workload, profile: EngineProfile) -> Result:
    rng = random.Random(w.seed)
    engine = SimEngine(profile, EngineConfig(block_size=BLOCK, kv_capacity_tokens=w.gpu_kv_tokens,
                                             max_num_batched_tokens=8192, max_num_seqs=256))
    cache = engine.cache
    kv = SessionKv(cache, host_blocks=w.host_kv_tokens // BLOCK,
                   bytes_per_block=profile.kv_bytes_per_token * BLOCK,
                   h2d_bytes_per_s=profile.h2d_bytes_per_s, ttl_s=1e9)
    system = [rng.getrandbits(62) for _ in range(w.system_tokens // BLOCK)]
    docs = [[rng.getrandbits(62) for _ in range(w.other_doc_tokens // BLOCK)]
            for _ in range(w.other_docs)]
    sessions: list[_Session] = []
    for i in range(w.sessions):
        turns = w.turns
        obs = [rng.randint(*w.observation_tokens) for _ in range(turns)]
        task = rng.randint(*w.task_tokens)
        total = w.system_tokens + task + turns * (w.output_tokens + max(obs))
        chain = system + [rng.getrandbits(62) for _ in range(total // BLOCK + 1)]
        lo, hi = math.log(w.pause_s[0]), math.log(w.pause_s[1])
        pauses = [math.exp(rng.uniform(lo, hi)) for _ in range(turns)]
        sessions.append(_Session(i, chain, pauses, obs, w.system_tokens + task))

    res = Result()
    heap: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()

    def at(t: float, kind: str, payload: Any) -> None:
        heapq.heappush(heap, (t, next(seq), kind, payload))

    meta: dict[int, tuple[str, Any, float]] = {}  # id(req) -> (kind, owner, resumed_at)
    rid = itertools.count()

    def submit(kind: str, owner: Any, prompt: int, hashes: list[int], out: int, now: float,
               resumed_at: float, load_until: float = 0.0) -> None:
        req = SimRequest(request_id=f"r{next(rid)}", hashes=hashes[: prompt // BLOCK],
                         prompt_tokens=prompt, max_tokens=out, load_until=load_until)
        meta[id(req)] = (kind, owner, resumed_at)
        res.useful_tokens += prompt + out
        engine.submit(req, now)

    def start_turn(s: _Session, now: float, resumed_at: float) -> None:
        hashes = s.chain[: s.context // BLOCK]
        kv.note(str(s.sid), hashes, now)
        # blocks a reload is still copying in: the prefill overlaps the copy layer by layer
        # (the live engine's Generate takes load_until from the same SessionKv call)
        submit("agent", s, s.context, hashes, w.output_tokens, now, resumed_at,
               kv.loading_until(hashes, now))

    def pause(s: _Session, now: float) -> None:
        """The turn ended in a tool call: apply the policy to the session's blocks."""
        p = s.pauses[s.turn]
        act = policy
        if policy == "auto":
            used = cache.used_blocks
            c = pause_costs(context_tokens=s.context, pause_s=p,
                            kv_bytes_per_token=profile.kv_bytes_per_token,
                            h2d_bytes_per_s=profile.h2d_bytes_per_s,
                            prefill_s=profile.prefill_time(s.context), total_blocks=cache.num_blocks,
                            used_blocks=used, block_size=BLOCK, host_free_blocks=kv.host_free)
            act = {KvAction.KEEP: "keep", KvAction.OFFLOAD: "offload",
                   KvAction.DROP: "reprefill"}[decide(c)]
        key = str(s.sid)
        if act == "offload_prefetch":
            # the client knows the tool's expected duration and calls Router.ResumeSession
            # ahead of its return by twice the copy time (Reload runs while the tool ends)
            lead = 2 * kv.copy_seconds(s.context // BLOCK)
            at(now + max(0.0, p - lead), "prefetch", s)
            act = "offload"
        if act == "keep":
            kv.keep(key, now)
        elif act == "offload":
            try:
                kv.offload(key, now)
            except HostFull:
                act = "lru"
        elif act == "reprefill":
            cache.discard(s.chain[: s.context // BLOCK])
        res.actions[act] = res.actions.get(act, 0) + 1
        s.context += w.output_tokens + s.observations[s.turn]
        s.turn += 1
        at(now + p, "resume", s)

    def prefetch(s: _Session, now: float) -> None:
        key = str(s.sid)
        if kv.state(key) == "host":
            res.reload_blocks += kv.reload(key, now).blocks  # lands before the tool returns

    def resume(s: _Session, now: float) -> None:
        key = str(s.sid)
        if kv.state(key) in ("kept", "host"):
            res.reload_blocks += kv.reload(key, now).blocks
        # the turn starts now, its prefill overlapping the reload's copy (start_turn)
        start_turn(s, now, now)

    queue = list(sessions)
    for s in queue[: w.concurrent]:
        at(rng.uniform(0.0, 10.0), "turn", (s, -1.0))
    waiting = queue[w.concurrent:]
    t = 0.0
    if w.other_rate > 0:
        t = rng.expovariate(w.other_rate)
        at(t, "other", None)
    active = w.concurrent

    def on_finished(req: SimRequest, now: float) -> None:
        nonlocal active
        kind, owner, _ = meta.pop(id(req))
        if kind != "agent":
            return
        s: _Session = owner
        if s.turn + 1 >= w.turns:
            active -= 1
            kv.forget(str(s.sid))
            if waiting:
                nxt = waiting.pop(0)
                active += 1
                at(now, "turn", (nxt, -1.0))
            return
        pause(s, now)

    def on_first(req: SimRequest, now: float) -> None:
        kind, _owner, resumed_at = meta[id(req)]
        ttft = now - (resumed_at if resumed_at >= 0 else req.arrival)
        if kind == "agent":
            if resumed_at >= 0:
                res.resumed_ttft.append(ttft)
                res.resumed_context.append(req.prompt_tokens)
            else:
                res.first_ttft.append(ttft)
        else:
            res.other_ttft.append(ttft)
            res.other_prompt += req.prompt_tokens
            res.other_hit += max(0, req.hit_blocks) * BLOCK

    handlers: dict[str, Callable[[Any, float], None]] = {}

    def h_turn(payload: Any, now: float) -> None:
        s, resumed_at = payload
        start_turn(s, now, resumed_at)

    def h_other(_: Any, now: float) -> None:
        if active <= 0:
            return  # the agents are done: stop the background traffic with them
        doc = rng.choice(docs)
        tail = [rng.getrandbits(62) for _ in range(2)]
        prompt = w.other_doc_tokens + 96
        submit("other", None, prompt, doc + tail, w.other_output, now, -1.0)
        at(now + rng.expovariate(w.other_rate), "other", None)

    handlers["turn"] = h_turn
    handlers["resume"] = resume
    handlers["prefetch"] = prefetch
    handlers["other"] = h_other
    last_progress = (-1.0, -1)
    while True:
        t_ev = heap[0][0] if heap else math.inf
        t_wake = engine.next_wakeup()
        if (t_wake, engine.stats.steps) == last_progress:
            t_wake = math.inf  # stalled (nothing admissible): only an event can unblock it
            res.stalls += 1
        if t_ev <= t_wake:
            if t_ev == math.inf:
                break
            engine.run_until(t_ev, inclusive=False)
            now, _, kind, payload = heapq.heappop(heap)
            handlers[kind](payload, now)
        else:
            last_progress = (t_wake, engine.stats.steps)
            engine.run_until(t_wake)
        for up in engine.drain_updates():
            if up.kind == "first_token":
                on_first(up.request, up.time)
            elif up.kind == "finished":
                res.makespan = max(res.makespan, up.time)
                on_finished(up.request, up.time)
            elif up.kind == "rejected":
                raise RuntimeError(f"request {up.request.request_id} does not fit the cache")
        engine.drain_kv_events()
    return res


def metrics(r: Result) -> dict[str, Any]:
    rt = summary(r.resumed_ttft)
    ctx = sorted(r.resumed_context)
    return {
        "resumed_ttft_p50_ms": rt["p50"] * 1e3, "resumed_ttft_p99_ms": rt["p99"] * 1e3,
        "resumed_ttft_mean_ms": rt["mean"] * 1e3, "resumed_turns": len(r.resumed_ttft),
        "resumed_context_p50_tokens": ctx[len(ctx) // 2] if ctx else 0,
        "first_ttft_p50_ms": summary(r.first_ttft)["p50"] * 1e3,
        "other_hit_rate": r.other_hit / r.other_prompt if r.other_prompt else float("nan"),
        "other_ttft_p50_ms": summary(r.other_ttft)["p50"] * 1e3,
        "other_ttft_p99_ms": summary(r.other_ttft)["p99"] * 1e3,
        "other_requests": len(r.other_ttft),
        "tokens_per_gpu_s": r.useful_tokens / r.makespan if r.makespan else 0.0,
        "makespan_s": r.makespan, "actions": r.actions, "reload_blocks": r.reload_blocks,
        "stalls": r.stalls,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.agentic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter sessions")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="PNG path (default: beside --json, else bench/results/)")
    ap.add_argument("--profile", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    profile = EngineProfile.load(args.profile)
    base = QUICK if args.quick else Workload()
    w = Workload(**{**base.__dict__, "seed": args.seed})
    out: dict[str, Any] = {}
    rows = []
    for p in args.policies.split(","):
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (expected {', '.join(POLICIES)})")
        t0 = time.perf_counter()
        m = metrics(run(p, w, profile))
        m["bench_wall_s"] = time.perf_counter() - t0
        out[p] = m
        rows.append([p, m["resumed_ttft_p50_ms"], m["resumed_ttft_p99_ms"], m["first_ttft_p50_ms"],
                     m["other_hit_rate"], m["other_ttft_p50_ms"], m["tokens_per_gpu_s"]])
        print(f"{p}: done in {m['bench_wall_s']:.1f} s", file=sys.stderr)
    print(table(rows, ["policy", "resumed p50 ms", "resumed p99 ms", "first p50 ms",
                       "other hit", "other p50 ms", "tok/s/GPU"]))
    ratios: dict[str, float] = {}
    if "offload" in out and "reprefill" in out:
        ratios["reprefill_over_offload_resumed_ttft_p50"] = (
            out["reprefill"]["resumed_ttft_p50_ms"] / out["offload"]["resumed_ttft_p50_ms"])
    if "offload_prefetch" in out and "reprefill" in out:
        ratios["reprefill_over_offload_prefetch_resumed_ttft_p50"] = (
            out["reprefill"]["resumed_ttft_p50_ms"] / out["offload_prefetch"]["resumed_ttft_p50_ms"])
    if "offload" in out and "keep" in out:
        ratios["offload_over_keep_tokens_per_gpu_s"] = (
            out["offload"]["tokens_per_gpu_s"] / out["keep"]["tokens_per_gpu_s"])
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    result = {"bench": "agentic", "quick": args.quick, "machine": machine(),
              "profile": profile.name, "device": profile.device,
              "h2d_GBps": profile.h2d_bytes_per_s / 1e9, "workload": w.__dict__,
              "targets": {"reprefill_over_offload_resumed_ttft_p50": ">= 5",
                          "offload_over_keep_tokens_per_gpu_s": ">= 1"},
              "ratios": ratios, "agentic": out}
    write_json(args.json, result)
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json
                         else str(REPO / "bench" / "results" / "agentic.png"))
    _plot(out, plot)
    return 0


def _plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].bar(names, [out[n]["resumed_ttft_p50_ms"] for n in names], label="p50")
    ax[0].scatter(names, [out[n]["resumed_ttft_p99_ms"] for n in names], color="k", label="p99",
                  zorder=3)
    ax[0].set_yscale("log")
    ax[0].set_title("resumed-turn TTFT (ms)")
    ax[0].legend()
    ax[1].bar(names, [out[n]["other_hit_rate"] for n in names])
    ax[1].set_title("other traffic: prefix hit rate")
    ax[2].bar(names, [out[n]["tokens_per_gpu_s"] for n in names])
    ax[2].set_title("tokens/s per GPU")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
