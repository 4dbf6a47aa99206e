"""`kvrouter demo`: a router and a small fleet of simulated engines on this machine,
driven by a shared-prefix multi-turn chat workload under several routing policies.

Nothing needs to be installed or running: the demo starts `kvrouter serve` and
`--workers` simulated engines (`kvrouter engine sim`) as child processes on free
loopback ports. By default the engines register with the router and send their KV
events and load over gRPC (the router's in-process event plane); `--redis URL`
puts the event plane on Redis instead.

For each policy the same kind of workload (fresh token ids per policy, so no
policy profits from another's cache) runs through the public API: Router.Route
with a per-request policy override, Engine.Generate on the chosen worker,
MarkPrefillDone at the first token, Release at the end. Each conversation shares
one of a few long system prompts and sends its turns one after another, each turn
carrying the whole history (the answers are the engine's generated tokens).

Reported per policy: the prefix-cache hit rate (cached prompt tokens / prompt
tokens, as the engines report them in Usage), the router's predicted overlap, and
time to first token measured at the client (Route + queueing + prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from kvrouter import mainloop
from kvrouter.testing.processes import (
    ChildProcess,
    RouterProcess,
    SimEngineProcess,
    sim_engine,
    start_router,
    stop_children,
)
from kvrouter.testing.wait import ProcessExited, WaitTimeout, async_wait_until

DEFAULT_POLICIES = "kv,round_robin,least_loaded"
_BLIND_POLICIES = frozenset({"round_robin", "random"})


class DemoError(RuntimeError):
    """The demo cannot go on (a child failed to start, a request failed)."""


# ----------------------------------------------------------------------------------
# child processes


class Fleet:
    """The router and engine processes of one demo run; `stop()` always cleans up."""

    def __init__(self, workdir: Path, workers: int, time_scale: float, block_size: int,
                 redis_url: str | None, kv_capacity_tokens: int | None,
                 profile: str | None) -> None:
        self.workdir = workdir
        self.n_workers = workers
        self.time_scale = time_scale
        self.block_size = block_size
        self.redis_url = redis_url
        self.kv_capacity_tokens = kv_capacity_tokens
        self.profile = profile
        self.namespace = f"kvdemo-{uuid.uuid4().hex[:8]}"
        self.model_options = ""
        self.router: RouterProcess | None = None
        self.engines: list[SimEngineProcess] = []
        self.target = ""
        self.http_url = ""

    def start_router(self, timeout_s: float) -> None:
        # the OpenAI-compatible HTTP front, with the simulated models' local tokenizer
        from kvrouter.http.tokenizer import sim_tokenizer
        from kvrouter.testing.processes import free_port

        self.http_url = f"http://127.0.0.1:{free_port()}"
        args = ["--model", f"default,block_size={self.block_size},tokenizer={sim_tokenizer()}"
                           f"{self.model_options}",
                "--http", self.http_url.removeprefix("http://")]
        env: dict[str, str] = {}
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
            env["KVROUTER_EVENT_PLANE"] = json.dumps({"namespace": self.namespace})
        try:
            self.router = start_router(self.workdir, None, args, env=env, timeout=timeout_s)
        except (ProcessExited, WaitTimeout) as e:
            raise DemoError(f"the router did not start: {e}") from e
        self.target = self.router.target

    def start_engines(self) -> None:
        for i in range(self.n_workers):
            args = ["--time-scale", repr(self.time_scale), "--block-size", str(self.block_size)]
            if self.kv_capacity_tokens:
                args += ["--kv-capacity-tokens", str(self.kv_capacity_tokens)]
            if self.profile:
                args += ["--profile", self.profile]
            if self.redis_url:
                eng = sim_engine(self.workdir, f"sim-{i}", redis=self.redis_url,
                                 namespace=self.namespace, args=args)
            else:
                eng = sim_engine(self.workdir, f"sim-{i}", router=self.target, args=args)
            self.engines.append(eng.start())

    def check_alive(self) -> None:
        for c in self.children():
            code = c.exit_code()
            if code is not None:
                raise DemoError(f"{c.name} exited with status {code}; its log ({c.log_path}):\n"
                                f"{c.log_tail(15)}")

    def children(self) -> list[ChildProcess]:
        return [*self.engines, *([self.router] if self.router else [])]

    def stop(self) -> None:
        # Engines first, so they deregister from a router that is still there.
        stop_children(self.engines, 5.0)
        if self.router is not None:
            self.router.stop(5.0)
        if self.redis_url:
            _delete_namespace(self.redis_url, self.namespace)


def _delete_namespace(url: str, namespace: str) -> None:
    """Remove the demo's Redis keys (streams, heartbeats, snapshots)."""
    try:
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
    except Exception as e:  # cleanup must not hide the demo's own result
        print(f"kvrouter demo: could not delete Redis keys {namespace}:*: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------------
# workload


@dataclass
class Workload:
    requests: int
    conversations: int
    groups: int
    system_tokens: int
    user_tokens: int
    output_tokens: int
    vocab: int
    seed: int
    think_s: float = 0.0


@dataclass
class PolicyResult:
    policy: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    predicted_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    per_worker: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    first_error: str = ""

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def predicted_rate(self) -> float:
        return self.predicted_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        t = sorted(self.ttft_s)
        return {
            "policy": self.policy, "requests": self.requests, "errors": self.errors,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "hit_rate": self.hit_rate, "predicted_hit_rate": self.predicted_rate,
            "ttft_mean_ms": 1e3 * sum(t) / len(t) if t else math.nan,
            "ttft_p50_ms": 1e3 * _quantile(t, 0.5), "ttft_p99_ms": 1e3 * _quantile(t, 0.99),
            "e2e_mean_ms": 1e3 * sum(self.e2e_s) / len(self.e2e_s) if self.e2e_s else math.nan,
            "per_worker": dict(sorted(self.per_worker.items())), "wall_s": self.wall_s,
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Progress:
    """A one-line progress bar on stderr (a line per policy when stderr is not a terminal)."""

    def __init__(self, stream: TextIO, total: int, label: str, enabled: bool = True) -> None:
        self.stream = stream
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.tty = stream.isatty()
        self.enabled = enabled
        self._last = 0.0

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.enabled and self.tty and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            width = 30
            filled = width * self.done // self.total
            self.stream.write(f"\r  {self.label:<14} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total}")
            self.stream.flush()

    def finish(self, note: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r\033[K  {self.label:<14} {self.done}/{self.total} {note}\n")
        else:
            self.stream.write(f"  {self.label:<14} {self.done}/{self.total} {note}\n")
        self.stream.flush()


class ChatWorkloadDriver:
    """Sends the chat workload through the router's gRPC API and the engines' Generate."""

    def __init__(self, target: str, workload: Workload) -> None:
        from kvrouter.client import AsyncRouterClient

        self.router = AsyncRouterClient(target, timeout=30.0)
        self.w = workload
        self._engines: dict[str, Any] = {}
        self._channels: list[Any] = []

    async def close(self) -> None:
        await self.router.close()
        for ch in self._channels:
            await ch.close()

    def _engine(self, address: str) -> Any:
        import grpc

        from kvrouter._proto.v1 import engine_pb2_grpc

        stub = self._engines.get(address)
        if stub is None:
            ch = grpc.aio.insecure_channel(address)
            self._channels.append(ch)
            stub = self._engines[address] = engine_pb2_grpc.EngineStub(ch)
        return stub

    async def wait_workers(self, fleet: Fleet, timeout_s: float) -> list[str]:
        """Until every engine is registered and routable at the router."""
        import grpc

        want = {f"sim-{i}" for i in range(fleet.n_workers)}

        async def routable() -> list[str]:
            ws = await self.router.list_workers("default")
            seen = {w.name for w in ws if w.routable and w.address}
            return sorted(seen) if want <= seen else []

        try:
            return await async_wait_until(routable, timeout_s, interval=0.2,
                                          what=f"engines {', '.join(sorted(want))} routable",
                                          procs=fleet.children(), ignore=(grpc.aio.AioRpcError,))
        except (ProcessExited, WaitTimeout) as e:
            raise DemoError(str(e)) from e

    async def one(self, policy: str, prompt: list[int], result: PolicyResult,
                  max_tokens: int) -> list[int]:
        """Route, generate, release one request; returns the generated tokens."""
        from kvrouter._proto.v1 import common_pb2, engine_pb2
        from kvrouter.client import tokens_le

        rid = f"demo-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        d = await self.router.route(prompt, request_id=rid, policy=policy,
                                    expected_output_tokens=max_tokens)
        released = False
        try:
            if not d.address:
                raise DemoError(f"worker {d.worker} has no engine address")
            req = engine_pb2.GenerateRequest(
                request_id=rid, token_ids_le=tokens_le(prompt),
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            first: float | None = None
            answer: list[int] = []
            usage = None
            async for resp in self._engine(d.address).Generate(req, timeout=60.0):
                if first is None and resp.token_ids:
                    first = time.perf_counter()
                    await self.router.mark_prefill_done(rid, worker=d.worker)
                answer.extend(resp.token_ids)
                if resp.finished:
                    usage = resp.usage
            end = time.perf_counter()
            await self.router.release(rid, worker=d.worker)
            released = True
        finally:
            if not released:
                with contextlib.suppress(Exception):
                    await self.router.release(rid, worker=d.worker)
        if first is None or usage is None:
            raise DemoError(f"request {rid} on {d.worker} ended without tokens or usage")
        result.requests += 1
        result.prompt_tokens += usage.prompt_tokens
        result.cached_tokens += usage.cached_tokens
        result.predicted_tokens += min(d.overlap_blocks * d.block_size, len(prompt))
        result.ttft_s.append(first - t0)
        result.e2e_s.append(end - t0)
        result.per_worker[d.worker] = result.per_worker.get(d.worker, 0) + 1
        return answer

    async def run(self, policy: str, index: int, progress: Progress) -> PolicyResult:
        import grpc

        w = self.w
        # Fresh token ids per policy: no policy profits from the cache another one left.
        rng = random.Random(w.seed * 1_000_003 + index)
        systems = [[rng.randrange(w.vocab) for _ in range(w.system_tokens)]
                   for _ in range(w.groups)]
        convs = max(1, min(w.conversations, w.requests))
        turns = [w.requests // convs + (1 if i < w.requests % convs else 0) for i in range(convs)]
        result = PolicyResult(policy)

        async def conversation(i: int) -> None:
            crng = random.Random(rng.random())
            await asyncio.sleep(crng.uniform(0.0, 0.2))  # do not start all in the same instant
            history = list(systems[i % w.groups])
            for _ in range(turns[i]):
                history += [crng.randrange(w.vocab) for _ in range(w.user_tokens)]
                try:
                    answer = await self.one(policy, history, result, w.output_tokens)
                except (grpc.aio.AioRpcError, DemoError) as e:
                    result.errors += 1
                    if not result.first_error:
                        result.first_error = (f"{e.code().name}: {e.details()}"
                                              if isinstance(e, grpc.aio.AioRpcError) else str(e))
                    progress.tick()
                    return  # the conversation's history is now unknown: end it
                history += answer
                progress.tick()
                # the user reads and types: without it conversations run in lockstep and
                # round robin would hand each one the same worker every turn by accident
                await asyncio.sleep(crng.expovariate(1.0 / w.think_s) if w.think_s > 0 else 0.0)

        t0 = time.monotonic()
        await asyncio.gather(*(conversation(i) for i in range(convs)))
        result.wall_s = time.monotonic() - t0
        return result

    async def warmup(self, workers: int) -> None:
        """A few throwaway requests so the first policy does not pay for cold processes."""
        rng = random.Random(-1)
        scratch = PolicyResult("warmup")
        for _ in range(2):
            await asyncio.gather(*(
                self.one("round_robin", [rng.randrange(self.w.vocab) for _ in range(64)], scratch, 2)
                for _ in range(workers)))


# ----------------------------------------------------------------------------------
# output


def format_table(results: Sequence[PolicyResult]) -> str:
    head = ("policy", "requests", "hit_rate", "predicted", "ttft_mean_ms", "ttft_p99_ms",
            "e2e_mean_ms", "errors")
    rows: list[tuple[str, ...]] = [head]
    for r in results:
        s = r.summary()
        # round_robin and random decide without looking at the index: nothing predicted
        predicted = "-" if r.policy in _BLIND_POLICIES else f"{s['predicted_hit_rate']:.3f}"
        rows.append((r.policy, str(r.requests), f"{s['hit_rate']:.3f}",
                     predicted, f"{s['ttft_mean_ms']:.1f}",
                     f"{s['ttft_p99_ms']:.1f}", f"{s['e2e_mean_ms']:.1f}", str(r.errors)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        cells = [c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths,
                                                                                      strict=True))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


async def _http_front_check(base: str) -> str:
    """One chat completion through the router's HTTP front: the demo fails if it does not
    answer as OpenAI would."""
    import httpx

    body = {"model": "default", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello from the kvrouter demo"}]}
    try:
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
            r = await client.post(f"{base}/v1/chat/completions", json=body)
        out = r.json()
        usage = out["usage"]
        return (f"a chat completion: {usage['prompt_tokens']} prompt tokens, "
                f"{usage['completion_tokens']} generated")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"the HTTP front at {base} did not answer a chat completion: "
                        f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------
# entry points


async def _run(args: argparse.Namespace, fleet: Fleet, policies: list[str]) -> list[PolicyResult]:
    fleet.start_router(args.start_timeout)
    fleet.start_engines()
    w = Workload(requests=args.requests, conversations=args.conversations, groups=args.groups,
                 system_tokens=args.system_tokens, user_tokens=args.user_tokens,
                 output_tokens=args.output_tokens, vocab=32000, seed=args.seed,
                 think_s=args.think_ms / 1e3)
    driver = ChatWorkloadDriver(fleet.target, w)
    quiet = args.quiet
    try:
        workers = await driver.wait_workers(fleet, args.start_timeout)
        if not quiet:
            plane = f"Redis {args.redis}" if args.redis else "gRPC to the router (in-process plane)"
            print(f"kvrouter demo: router {fleet.target}, {len(workers)} simulated engines "
                  f"(events: {plane}), time scale {args.time_scale:g}", file=sys.stderr)
        reply = await _http_front_check(fleet.http_url)
        if not quiet:
            print(f"kvrouter demo: OpenAI-compatible HTTP front at {fleet.http_url}/v1 "
                  f"({reply})", file=sys.stderr)
        await driver.warmup(len(workers))
        results = []
        for i, policy in enumerate(policies):
            progress = Progress(sys.stderr, args.requests, policy, enabled=not quiet)
            r = await driver.run(policy, i, progress)
            progress.finish(f"in {r.wall_s:.1f}s" + (f", {r.errors} failed" if r.errors else ""))
            results.append(r)
            fleet.check_alive()
        return results
    finally:
        await driver.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvrouter.config import POLICIES

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if not policies or bad:
        print(f"kvrouter demo: unknown policy {', '.join(bad) or '(none given)'} "
              f"(choose from {', '.join(POLICIES)})", file=sys.stderr)
        return 2
    checks = [(args.workers, "--workers"), (args.requests, "--requests"),
              (args.conversations, "--conversations"), (args.groups, "--groups"),
              (args.system_tokens, "--system-tokens"), (args.user_tokens, "--user-tokens"),
              (args.output_tokens, "--output-tokens")]
    for value, name in checks:
        if value <= 0:
            print(f"kvrouter demo: {name} must be > 0, got {value}", file=sys.stderr)
            return 2
    if not args.think_ms >= 0:
        print(f"kvrouter demo: --think-ms must be >= 0, got {args.think_ms}", file=sys.stderr)
        return 2
    if not args.time_scale > 0 or not math.isfinite(args.time_scale):
        print(f"kvrouter demo: --time-scale must be > 0, got {args.time_scale}", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="kvrouter-demo-"))
    fleet = Fleet(workdir, args.workers, args.time_scale, args.block_size, args.redis,
                  args.kv_capacity_tokens, args.profile)
    fleet.model_options = "".join(f",{o}" for o in args.router_model_option)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds into the finally below, which stops the children

    previous = signal.signal(signal.SIGTERM, on_term)
    ok = False
    results: list[PolicyResult] = []
    try:
        results = mainloop.run(_run(args, fleet, policies))
        ok = True
    except KeyboardInterrupt:
        ok = True  # nothing failed: no logs to look at
        print("\nkvrouter demo: interrupted, stopping the router and engines", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"kvrouter demo: {e}", file=sys.stderr)
        return 1
    finally:
        # Ignore further Ctrl-C / SIGTERM while the children are being stopped.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            fleet.stop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, previous)
        if ok or args.keep_logs:
            if args.keep_logs:
                print(f"kvrouter demo: logs kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kvrouter demo: logs in {workdir}", file=sys.stderr)

    if args.json:
        print(json.dumps({"workers": args.workers, "time_scale": args.time_scale,
                          "event_plane": "redis" if args.redis else "in-process (gRPC)",
                          "hit_rate_source": "engine Usage.cached_tokens",
                          "results": [r.summary() for r in results]}, indent=2))
    else:
        print(f"\n{args.workers} simulated engines (H100, Llama-3-8B-shaped cost model), "
              f"time scale {args.time_scale:g}; {args.requests} requests per policy in "
              f"{min(args.conversations, args.requests)} concurrent conversations over {args.groups} shared "
              f"system prompts of {args.system_tokens} tokens.")
        print(format_table(results))
        print("\nhit_rate: cached prompt tokens / prompt tokens, as reported by the engines "
              "(Usage.cached_tokens); predicted: the router's overlap estimate at routing time\n"
              "(- for policies that do not consult the index).\n"
              "ttft: measured at the client from Route to the first streamed token, wall-clock ms "
              f"(engine time runs {1 / args.time_scale:g}x faster than wall time).")
        for r in results:
            if r.first_error:
                print(f"{r.policy}: {r.errors} failed requests, first: {r.first_error}",
                      file=sys.stderr)
    return 1 if any(r.errors for r in results) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL",
                   help="run the event plane on Redis (default: engines report to the router "
                        "over gRPC, nothing else needed)")
    p.add_argument("--workers", type=int, default=4, help="simulated engines (default 4)")
    p.add_argument("--requests", type=int, default=160, help="requests per policy (default 160)")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma separated routing policies (default %(default)s; also "
                        "prefix_only, random)")
    p.add_argument("--conversations", type=int, default=8,
                   help="concurrent conversations (default 8)")
    p.add_argument("--groups", type=int, default=4,
                   help="distinct system prompts shared by the conversations (default 4)")
    p.add_argument("--system-tokens", type=int, default=1024, help="system prompt length")
    p.add_argument("--user-tokens", type=int, default=256, help="new user tokens per turn")
    p.add_argument("--output-tokens", type=int, default=64, help="generated tokens per turn")
    p.add_argument("--think-ms", type=float, default=50.0,
                   help="mean pause between a conversation's turns, wall ms (default 50)")
    p.add_argument("--time-scale", type=float, default=0.5,
                   help="engine wall seconds per simulated second (default 0.5: 2x faster)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    p.add_argument("--kv-capacity-tokens", type=int,
                   help="KV cache per engine in tokens (default: what fits on an H100)")
    p.add_argument("--profile", help="calibration file of the engines' cost model")
    p.add_argument("--router-model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra setting of the router's model, e.g. weights.decode=0.5 (repeatable; "
                        "see kvrouter serve --model)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds to wait for the router and engines to come up")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    p.add_argument("--keep-logs", action="store_true", help="keep the children's logs")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run a router and simulated engines locally and compare routing policies",
        description="Start a router and simulated engines as local processes, drive a "
                    "shared-prefix multi-turn workload through the gRPC API under each policy, "
                    "and print hit rate and time to first token per policy.")
    add_arguments(p)
    p.set_defaults(func=_cmd_demo)
