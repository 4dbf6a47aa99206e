"""Chaos benchmark (issue 13, item 5): mixed load on a Redis-backed fleet while faults
are injected on a schedule; what clients saw, whether anything was lost, and whether
the routers' indexes match the engines' truth after recovery.

Fleet, all real processes on loopback: a Redis primary + replica + Sentinel
(kvrouter.testing.redis_topologies), two `kvrouter serve` replicas on the Sentinel URL,
four sim engines (model `default`) publishing to Redis, and 60 synthetic workers
(model `events`) publishing from this process: 64 event publishers in all.

Load: unary Route + Release, RouteStream batches, Router.Generate streams through the
sim engines. A client retries a retriable status (UNAVAILABLE, RESOURCE_EXHAUSTED,
ABORTED) on the other replica, at most 4 attempts.

Faults, at fixed fractions of the run: the Redis primary SIGKILLed (Sentinel promotes
the replica); router replica 1 SIGKILLed and restarted (it restores from its
snapshot); a sim engine SIGKILLed mid-stream and restarted (a new epoch); a client
flooding oversized requests (16 MiB messages, 2M-token prompts, 300K-item RouteStream
messages) for a tenth of the run.

Reported: requests by outcome, `lost` (no answer: a client deadline passed, or UNKNOWN
/ INTERNAL, or a Generate stream that ended without finishing or a status),
`errors_by_code` (final, after retries), `divergent_blocks` (synthetic workers: the
routers' snapshots against each worker's truth, block by block; sim engines: replica 0
against replica 1), `rss_growth` of the router that was never killed (from the end of
the warm-up, when its index is at its steady size: `indexed_blocks` then and at the end),
and Route decision p50/p99 inside and outside the fault windows.

    python -m bench.chaos --quick --json bench/results/chaos-quick.json   # 2 minutes
    python -m bench.chaos --json bench/results/chaos.json                 # 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import redis as redis_sync

from bench.common import machine, summary, table, write_json
from kvrouter import PrefixIndex
from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.events.keys import Keys
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.events.workload import SyntheticCache
from kvrouter.testing.processes import (
    RouterProcess,
    SimEngineProcess,
    start_router,
    start_sim_engine,
)
from kvrouter.testing.redis_topologies import SentinelSetup

BS = 16
GEN_MODEL = "default"
EVENTS_MODEL = "events"
ENGINES = 4
# The simulated engines' KV cache: small enough to fill during the warm-up (the load stores
# ~250 new output blocks/s across the engines), so RSS is measured from a steady index
# as the warm-up intends. At the profile's size (~27K blocks per engine) the index was
# still filling at the end of a 10-minute run, and that growth read as RSS growth.
GEN_KV_TOKENS = 16_384
SYNTHETIC = 60
RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
LOST_CODES = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
DEADLINE_S = 15.0


@dataclass
class Tally:
    """Outcomes of the well-behaved clients (the flood is counted apart)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    flood: Counter[str] = field(default_factory=Counter)
    route_lat: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    lost: int = 0

    def final(self, kind: str, code: grpc.StatusCode | None) -> None:
        name = "OK" if code is None else code.name
        self.outcomes[f"{kind}:{name}"] += 1
        if code in LOST_CODES:
            self.lost += 1


@dataclass
class Fleet:
    work: Path
    sentinel: SentinelSetup
    namespace: str
    routers: list[RouterProcess] = field(default_factory=list)
    engines: list[SimEngineProcess] = field(default_factory=list)

    def router_config(self, replica: str) -> dict[str, Any]:
        return {"router": {"redis_url": self.sentinel.url, "heartbeat_timeout_s": 10,
                           "event_plane": {"namespace": self.namespace, "replica_id": replica,
                                           "snapshot_interval_s": 3.0, "heartbeat_ttl_s": 6.0}},
                "models": [{"name": GEN_MODEL, "block_size": BS},
                           {"name": EVENTS_MODEL, "block_size": BS}]}

    def start_router(self, i: int) -> RouterProcess:
        rp = start_router(self.work / f"router{i}", self.router_config(f"replica{i}"), name=f"router{i}",
                          timeout=60)
        if i < len(self.routers):
            self.routers[i] = rp
        else:
            self.routers.append(rp)
        return rp

    def start_engine(self, i: int) -> SimEngineProcess:
        eng = start_sim_engine(self.work / "engines", f"sim{i}", redis=self.sentinel.url,
                               namespace=self.namespace,
                               args=("--time-scale", "0.05", "--block-size", str(BS),
                                     "--kv-capacity-tokens", str(GEN_KV_TOKENS)))
        if i < len(self.engines):
            self.engines[i] = eng
        else:
            self.engines.append(eng)
        return eng

    def targets(self) -> list[str]:
        return [r.target for r in self.routers if r.popen is not None and r.popen.poll() is None]

    def stop(self) -> None:
        for e in self.engines:
            e.kill()
        for r in self.routers:
            r.kill()
        self.sentinel.stop()


class Clients:
    """Load generators against whichever replicas are up; one channel per target."""

    def __init__(self, fleet: Fleet, tally: Tally, prompts: list[list[int]]) -> None:
        self.fleet, self.tally, self.prompts = fleet, tally, prompts
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.rng = random.Random(7)

    def stub(self, attempt: int) -> router_pb2_grpc.RouterStub:
        targets = self.fleet.targets() or [r.target for r in self.fleet.routers]
        target = targets[(self.rng.randrange(len(targets)) + attempt) % len(targets)]
        if target not in self.channels:
            self.channels[target] = grpc.aio.insecure_channel(
                target, options=[("grpc.max_send_message_length", 64 << 20),
                                         ("grpc.max_receive_message_length", 64 << 20)])
        return router_pb2_grpc.RouterStub(self.channels[target])

    async def _retrying(self, kind: str, call: Any) -> grpc.StatusCode | None:
        code: grpc.StatusCode | None = None
        for attempt in range(4):
            try:
                await call(self.stub(attempt))
                code = None
            except grpc.aio.AioRpcError as err:
                code = err.code()
            self.tally.attempts[f"{kind}:{'OK' if code is None else code.name}"] += 1
            if code not in RETRIABLE:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        self.tally.final(kind, code)
        return code

    async def unary(self, stop: asyncio.Event, rate: float) -> None:
        while not stop.is_set():
            prompt = self.rng.choice(self.prompts)
            model = GEN_MODEL if self.rng.random() < 0.5 else EVENTS_MODEL
            rid = uuid.uuid4().hex

            async def call(stub: router_pb2_grpc.RouterStub, model: str = model, prompt: list[int] = prompt,
                           rid: str = rid) -> None:
                t0 = time.perf_counter()
                d = await stub.Route(router_pb2.RouteRequest(model=model, token_ids=prompt, request_id=rid),
                                     timeout=DEADLINE_S)
                self.tally.route_lat.append((time.monotonic(), time.perf_counter() - t0))
                with contextlib.suppress(grpc.aio.AioRpcError):  # the replica may have died since
                    await stub.Release(router_pb2.ReleaseRequest(model=model, request_id=rid,
                                                                 worker=d.worker), timeout=DEADLINE_S)

            await self._retrying("route", call)
            await asyncio.sleep(1 / rate)

    async def stream(self, stop: asyncio.Event, batch: int) -> None:
        while not stop.is_set():
            items = [router_pb2.RouteStreamItem(route=router_pb2.RouteRequest(
                model=EVENTS_MODEL, token_ids=self.rng.choice(self.prompts), dry_run=True))
                for _ in range(batch)]

            async def call(stub: router_pb2_grpc.RouterStub,
                           items: list[router_pb2.RouteStreamItem] = items) -> None:
                responses = stub.RouteStream(iter([router_pb2.RouteStreamRequest(seq=1, items=items)]),
                                             timeout=DEADLINE_S)
                got = [r async for r in responses]
                if not got or len(got[0].results) != batch:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "RouteStream answered short")

            await self._retrying("route_stream", call)
            await asyncio.sleep(0.05)

    async def generate(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            prompt = self.rng.choice(self.prompts)

            async def call(stub: router_pb2_grpc.RouterStub, prompt: list[int] = prompt) -> None:
                req = router_pb2.RouterGenerateRequest(
                    model=GEN_MODEL, token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=32))
                finished = False
                async for chunk in stub.Generate(req, timeout=DEADLINE_S):
                    finished = finished or chunk.finished
                if not finished:  # ended without finishing and without a status: lost
                    raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "stream ended unfinished")

            await self._retrying("generate", call)

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


# ---------------------------------------------------------------------- the abusive client
def flood(targets: list[str], seconds: float) -> dict[str, int]:
    """Oversized and abusive requests for `seconds`, from a process of its own (building
    and reading 300K-item messages would otherwise stall this process's load
    generators, not the router). Every answer must be a clear refusal or a full answer."""
    huge_prompt = router_pb2.RouteRequest(model=EVENTS_MODEL, token_ids=list(range(2_000_000)))
    fat = router_pb2.RouteRequest(model=EVENTS_MODEL, token_ids=list(range(100_000, 6_000_000)))  # 20 MiB
    # Under the 16 MiB message limit (30 bytes an item): the work, not the size, is the attack.
    big_stream = router_pb2.RouteStreamRequest(seq=1, items=[router_pb2.RouteStreamItem(
        route=router_pb2.RouteRequest(model=EVENTS_MODEL, token_ids=list(range(100, 116)), dry_run=True))
        for _ in range(300_000)])
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    seen: Counter[str] = Counter()
    stop = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop:
        with grpc.insecure_channel(targets[i % len(targets)], options=opts) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            i += 1
            for name, req in (("prompt_2m", huge_prompt), ("message_20mib", fat)):
                if time.monotonic() >= stop:
                    break
                try:
                    stub.Route(req, timeout=max(0.5, min(DEADLINE_S, stop - time.monotonic())))
                    seen[f"{name}:OK"] += 1
                except grpc.RpcError as err:
                    seen[f"{name}:{err.code().name}"] += 1
            if time.monotonic() >= stop:
                break
            try:
                # Bounded by the window: the flood must not spill into the quiet period.
                n = sum(len(r.results) for r in stub.RouteStream(
                    iter([big_stream]), timeout=max(0.5, stop - time.monotonic())))
                seen["stream_300k:OK" if n == 300_000 else "stream_300k:SHORT"] += 1
            except grpc.RpcError as err:
                seen[f"stream_300k:{err.code().name}"] += 1
    return dict(seen)


def indexed_blocks(target: str) -> int:
    """Blocks in a router's index, all models (what its RSS should follow)."""
    with RouterClient(target) as c:
        return sum(w.cached_blocks for w in c.list_workers())


# ---------------------------------------------------------------------- truth after recovery
def _snapshot_sets(r: redis_sync.Redis, keys: Keys, model: str, replica: str
                   ) -> tuple[float, dict[str, set[int]]]:
    raw = r.hgetall(keys.snapshot(model, replica))
    if not raw:
        return 0.0, {}
    meta = msgpack.unpackb(raw[b"meta"], raw=False)
    data = raw[b"data"]
    assert isinstance(data, bytes), "the client decodes no responses"
    index = PrefixIndex.from_snapshot(data)
    return float(meta["t"]), {w["name"]: {h for h, _ in index.worker_router_hashes(w["wid"])}
                              for w in meta["workers"]}


def _primary_client(sentinel: SentinelSetup) -> redis_sync.Redis:
    return redis_sync.Redis(host="127.0.0.1", port=sentinel.primary(), socket_timeout=5)


def divergence(fleet: Fleet, caches: dict[str, SyntheticCache], after: float,
               timeout: float = 60.0) -> dict[str, int]:
    """Blocks on which the routers disagree with the truth, from snapshots both replicas
    wrote after `after` (the end of the load)."""
    keys = Keys(fleet.namespace)
    deadline = time.monotonic() + timeout
    while True:
        r = _primary_client(fleet.sentinel)
        snaps = {m: [_snapshot_sets(r, keys, m, f"replica{i}") for i in range(len(fleet.routers))]
                 for m in (EVENTS_MODEL, GEN_MODEL)}
        fresh = all(t > after for per_model in snaps.values() for t, _ in per_model)
        synthetic = sum(len(sets.get(n, set()) ^ c.router_hashes())
                        for _, sets in snaps[EVENTS_MODEL] for n, c in caches.items())
        (_, a), (_, b) = snaps[GEN_MODEL][0], snaps[GEN_MODEL][1]
        engines = sum(len(a.get(e.name, set()) ^ b.get(e.name, set())) for e in fleet.engines)
        if (fresh and synthetic + engines == 0) or time.monotonic() > deadline:
            return {"synthetic_vs_truth": synthetic, "engines_replica0_vs_1": engines, "fresh": int(fresh)}
        time.sleep(1.0)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------- the run
async def run(duration: float, work: Path) -> dict[str, Any]:
    ns = "chaos-" + uuid.uuid4().hex[:6]
    fleet = Fleet(work, SentinelSetup(work / "redis").start(), ns)
    tally = Tally()
    rng = random.Random(3)
    groups = [[rng.randrange(32000) for _ in range(BS * 8)] for _ in range(12)]
    prompts = [g + [rng.randrange(32000) for _ in range(BS * rng.randint(1, 6))] for g in groups for _ in range(8)]
    pubs: dict[str, EventPublisher] = {}
    clients: Clients | None = None
    try:
        for i in range(2):
            fleet.start_router(i)
        for i in range(ENGINES):
            fleet.start_engine(i)
        caches = {f"syn{i}": SyntheticCache(BS, seed=100 + i, max_blocks=400) for i in range(SYNTHETIC)}
        pubs = {n: redis_publisher(fleet.sentinel.url, EVENTS_MODEL, n, namespace=ns, block_size=BS,
                                   dump=c.dump, heartbeat_ttl_s=6.0, max_buffer_events=50_000)
                for n, c in caches.items()}
        for p in pubs.values():
            await p.start()
        stop = asyncio.Event()

        async def publish() -> None:
            while not stop.is_set():
                for n, c in caches.items():
                    pubs[n].publish(c.step())
                await asyncio.sleep(0.1)

        clients = Clients(fleet, tally, prompts)
        tasks = [asyncio.create_task(publish()),
                 *(asyncio.create_task(clients.unary(stop, 40)) for _ in range(2)),
                 asyncio.create_task(clients.stream(stop, 64)),
                 *(asyncio.create_task(clients.generate(stop)) for _ in range(4))]
        t0 = time.monotonic()
        windows: list[tuple[str, float, float]] = []
        rss_samples: list[tuple[float, int]] = []

        async def sample_rss() -> None:  # the router that is never killed
            while not stop.is_set():
                rss_samples.append((time.monotonic() - t0, rss_kib(fleet.routers[0].pid)))
                await asyncio.sleep(1.0)

        tasks.append(asyncio.create_task(sample_rss()))

        async def at(frac: float) -> None:
            await asyncio.sleep(max(0.0, t0 + duration * frac - time.monotonic()))

        def log(msg: str) -> None:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

        # Warm-up to 25%: the indexes fill to their steady size; RSS is measured from there.
        await at(0.25)
        rss0 = rss_kib(fleet.routers[0].pid)
        blocks0 = await asyncio.to_thread(indexed_blocks, fleet.routers[0].target)
        log(f"warm; router 0 RSS {rss0} KiB")
        await at(0.3)
        start = time.monotonic()
        old = await asyncio.to_thread(fleet.sentinel.kill_primary)
        log(f"SIGKILLed the Redis primary (port {old}); Sentinel fails over")
        windows.append(("redis_failover", start, start + 10))
        await at(0.45)
        start = time.monotonic()
        fleet.routers[1].kill()
        log("SIGKILLed router replica 1")
        await asyncio.sleep(3)
        await asyncio.to_thread(fleet.start_router, 1)
        log("router replica 1 restarted")
        windows.append(("router_sigkill", start, time.monotonic() + 5))
        await at(0.6)
        start = time.monotonic()
        fleet.engines[0].kill()
        log("SIGKILLed sim engine 0 mid-stream")
        await asyncio.sleep(3)
        await asyncio.to_thread(fleet.start_engine, 0)
        log("sim engine 0 restarted")
        windows.append(("engine_sigkill", start, time.monotonic() + 5))
        await at(0.7)
        start = time.monotonic()
        log("flooding oversized requests")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seen = await asyncio.get_running_loop().run_in_executor(
                pool, flood, fleet.targets(), duration * 0.1)
        tally.flood.update(seen)
        windows.append(("oversized_flood", start, time.monotonic()))
        log("quiet until the end")
        await at(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        end = time.time()
        log("load stopped; waiting for convergence")
        for p in pubs.values():
            await p.flush(30)
        div = await asyncio.to_thread(divergence, fleet, caches, end)
        rss1 = rss_kib(fleet.routers[0].pid)  # after the quiet period and the convergence check
        blocks1 = await asyncio.to_thread(indexed_blocks, fleet.routers[0].target)

        def in_window(t: float) -> bool:
            return any(a <= t <= b for _, a, b in windows)

        inside = [s * 1e3 for t, s in tally.route_lat if in_window(t)]
        outside = [s * 1e3 for t, s in tally.route_lat if not in_window(t)]
        by_code: Counter[str] = Counter()
        for k, v in tally.outcomes.items():
            if not k.endswith(":OK"):
                by_code[k.split(":", 1)[1]] += v
        return {
            "duration_s": duration,
            "requests": dict(tally.outcomes),
            "attempts": dict(tally.attempts),
            "lost": tally.lost,
            "errors_by_code": dict(by_code),
            "flood": dict(tally.flood),
            "divergent_blocks": div["synthetic_vs_truth"] + div["engines_replica0_vs_1"],
            "divergence": div,
            "indexed_blocks": {"after_warmup": blocks0, "end": blocks1},
            "rss_kib": {"after_warmup": rss0, "end": rss1, "samples": [(round(t, 1), v) for t, v in rss_samples]},
            "rss_growth": (rss1 - rss0) / rss0 if rss0 else float("nan"),
            # Every k-th decision: enough for the plot, small enough to commit.
            "route_ms_timeline": [(round(t - t0, 2), round(s * 1e3, 3))
                                  for t, s in tally.route_lat[::max(1, len(tally.route_lat) // 1500)]],
            "route_ms_in_fault_windows": summary(inside),
            "route_ms_outside": summary(outside),
            "fault_windows": [{"fault": n, "start_s": a - t0, "end_s": b - t0} for n, a, b in windows],
        }
    finally:
        if clients is not None:
            await clients.close()
        for p in pubs.values():
            with contextlib.suppress(Exception):
                await p.stop()
        fleet.stop()


def plot(res: dict[str, Any], path: Path) -> None:
    """Route latency and router RSS over the run, fault windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    tl = res["route_ms_timeline"]
    ax1.scatter([t for t, _ in tl], [v for _, v in tl], s=2, alpha=0.4)
    ax1.set_yscale("log")
    ax1.set_ylabel("Route latency (ms)")
    samples = res["rss_kib"]["samples"]
    ax2.plot([t for t, _ in samples], [v / 1024 for _, v in samples])
    ax2.set_ylabel("router 0 RSS (MiB)")
    ax2.set_xlabel("seconds")
    for w in res["fault_windows"]:
        for ax in (ax1, ax2):
            ax.axvspan(w["start_s"], w["end_s"], color="tab:red", alpha=0.12)
        ax1.text(w["start_s"], ax1.get_ylim()[1], w["fault"], fontsize=7, va="top")
    fig.suptitle(f"chaos: lost {res['lost']}, divergent blocks {res['divergent_blocks']}, "
                 f"RSS growth {res['rss_growth']:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 minutes instead of 10")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (overrides --quick)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    duration = args.duration or (120.0 if args.quick else 600.0)
    with tempfile.TemporaryDirectory(prefix="kvr-chaos-") as d:
        res = asyncio.run(run(duration, Path(d)))
    res["machine"] = machine()
    print(table([[k, v] for k, v in sorted(res["requests"].items())], ["client:outcome", "requests"]))
    print(table([[k, v] for k, v in sorted(res["flood"].items())], ["flood:outcome", "requests"]))
    inside, outside = res["route_ms_in_fault_windows"], res["route_ms_outside"]
    print(table([["lost", res["lost"]], ["divergent_blocks", res["divergent_blocks"]],
                 ["rss_growth", f"{res['rss_growth']:.2%}"],
                 ["indexed blocks warm/end", "{after_warmup} / {end}".format(**res["indexed_blocks"])],
                 ["route p50/p99 ms in faults", f"{inside['p50']:.2f} / {inside['p99']:.2f}"],
                 ["route p50/p99 ms outside", f"{outside['p50']:.2f} / {outside['p99']:.2f}"]],
                ["metric", "value"]))
    write_json(args.json, res)
    if args.json:
        plot(res, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
