"""Event plane benchmark: end-to-end ingest through Redis and replica cold start.

    python -m bench.events --quick --json bench/results/events.json

1. Throughput: 64 publishers (EventPublisher over Redis, in a separate process)
   push BlockStored events as fast as they can; one router (RedisPlane: XREAD,
   envelope parsing, PrefixIndex.apply_payloads) ingests them. Reported: events/s,
   blocks/s from first publish to last block applied. Payloads carry precomputed
   router hashes; a second, smaller run carries token ids (the router re-hashes).
2. Lag: the same publishers offer a fixed rate (100K blocks/s by default);
   publish-to-index lag per entry (publisher clock at its first event to applied).
3. Cold start: the router snapshots its index (>= 1M blocks), more events arrive,
   then a fresh replica starts: time until it has loaded the snapshot and replayed
   the rest of the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import time
import uuid
from typing import Any
from unittest import mock

from bench.common import machine, summary, table, write_json
from kvrouter.events import metrics as event_metrics
from kvrouter.events.model import BlockStored
from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.events.redis_conn import RedisConfig, delete_namespace, make_client
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.registry import Registry

MODEL = "bench"


def _events(rng: random.Random, n_events: int, blocks: int, block_size: int,
            tokens: bool) -> list[BlockStored]:
    out = []
    parent: int | None = None
    for i in range(n_events):
        hashes = tuple(rng.getrandbits(63) + 1 for _ in range(blocks))
        if tokens:
            ev = BlockStored(hashes=hashes, parent=parent, block_size=block_size,
                             token_ids=tuple(rng.randrange(32000) for _ in range(blocks * block_size)))
        else:
            ev = BlockStored(hashes=hashes, parent=parent, block_size=block_size,
                             router_hashes=tuple(rng.getrandbits(63) + 1 for _ in range(blocks)))
        out.append(ev)
        parent = None if i % 8 == 7 else hashes[-1]  # chains of 8 events, then a new prompt
    return out


async def _publish(args: dict[str, Any], conn: Any) -> None:
    rng = random.Random(args["seed"])
    n_pub, per_pub = args["publishers"], args["events_per_publisher"]
    events = [_events(rng, per_pub, args["blocks_per_event"], args["block_size"], args["tokens"])
              for _ in range(n_pub)]
    cfg = RedisConfig(args["redis"], max_connections=None)
    clients = [make_client(cfg) for _ in range(4)]
    pubs: list[EventPublisher] = [
        redis_publisher(args["redis"], MODEL, f"{args['prefix']}{i}", namespace=args["ns"],
                        num_shards=args["shards"], block_size=args["block_size"],
                        client=clients[i % len(clients)], max_buffer_events=10_000_000,
                        heartbeat_ttl_s=3600.0)
        for i in range(n_pub)]
    for p in pubs:
        await p.start()
    await asyncio.sleep(0.5)
    conn.send(("start", time.time()))
    rate = args["rate_blocks_per_s"]
    t0 = time.perf_counter()
    if rate <= 0:
        # Flat out: hand each publisher its events in slices so all write concurrently.
        step = 64
        for lo in range(0, per_pub, step):
            for i, p in enumerate(pubs):
                p.publish(events[i][lo:lo + step])
            await asyncio.sleep(0)
    else:
        per_event = args["blocks_per_event"]
        total = n_pub * per_pub
        interval = per_event / rate  # seconds between events, fleet-wide
        for k in range(total):
            due = t0 + k * interval
            delay = due - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            i = k % n_pub
            pubs[i].publish([events[i][k // n_pub]])
    for p in pubs:
        await p.flush(120)
    conn.send(("done", time.time(), sum(p.stats.events for p in pubs)))
    conn.recv()  # keep heartbeating until the parent is done measuring
    for p in pubs:
        await p.stop(leave=False)
    for c in clients:
        await c.aclose()


def _publisher_main(args: dict[str, Any], conn: Any) -> None:
    try:
        import uvloop

        uvloop.run(_publish(args, conn))
    except ImportError:
        asyncio.run(_publish(args, conn))


class LagSamples:
    """Every publish-to-index lag the router observes on kvrouter_ingest_lag_seconds.

    Stands in for that histogram while the bench runs (its buckets are too coarse for a
    p50 of ~2 ms) and passes each sample on to it: the router runs its production code,
    with no hook for the bench."""

    def __init__(self, hist: Any) -> None:
        self.hist = hist
        self.samples: list[float] = []

    def observe(self, amount: float, exemplar: Any = None) -> None:
        self.samples.append(amount)
        self.hist.observe(amount, exemplar)


async def _run_phase(plane: RedisPlane, lags: LagSamples, args: dict[str, Any],
                     expect_blocks: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_publisher_main, args=(args, child), daemon=True)
    base = plane.core.stats.blocks_stored
    lags.samples.clear()
    proc.start()
    try:
        while not parent.poll():
            await asyncio.sleep(0.01)
        _, t_start = parent.recv()
        deadline = time.monotonic() + 300
        while plane.core.stats.blocks_stored - base < expect_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        t_end = time.time()
        while not parent.poll():
            await asyncio.sleep(0.01)
        _, t_pub_done, events = parent.recv()
        parent.send("bye")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    got = plane.core.stats.blocks_stored - base
    secs = t_end - t_start
    lags_ms = [x * 1000 for x in lags.samples]
    return {"blocks": got, "events": events, "seconds": secs, "blocks_per_s": got / secs,
            "events_per_s": events / secs, "publish_seconds": t_pub_done - t_start,
            "lag_ms": summary(lags_ms) if lags_ms else {}}


async def main_async(a: argparse.Namespace, lags: LagSamples) -> dict[str, Any]:
    ns = "kvrbench-" + uuid.uuid4().hex[:8]
    bs = 16
    reg = Registry()
    reg.add_model(MODEL, bs)
    plane = make_event_plane(reg, a.redis, namespace=ns, num_shards=a.shards, snapshot_interval_s=0,
                             heartbeat_ttl_s=3600.0, max_stream_len=None,
                             xread_count=a.xread_count, replica_id="bench-a")
    assert isinstance(plane, RedisPlane)
    await plane.start()
    result: dict[str, Any] = {"machine": machine(), "publishers": a.publishers, "shards": a.shards,
                              "blocks_per_event": a.blocks_per_event, "block_size": bs}
    try:
        import hiredis  # noqa: F401

        result["hiredis"] = True
    except ImportError:
        result["hiredis"] = False
    common = {"redis": a.redis, "ns": ns, "shards": a.shards, "publishers": a.publishers,
              "blocks_per_event": a.blocks_per_event, "block_size": bs}
    try:
        # 1. throughput, precomputed router hashes; 1M+ blocks also feed the cold start.
        per_pub = max(1, a.blocks // (a.publishers * a.blocks_per_event))
        r1 = await _run_phase(plane, lags, {**common, "seed": 1, "prefix": "w", "events_per_publisher": per_pub,
                                      "tokens": False, "rate_blocks_per_s": 0},
                              per_pub * a.publishers * a.blocks_per_event)
        result["throughput_hashes"] = r1
        # 1b. token-carrying payloads (router re-hashes every block).
        per_pub_t = max(1, a.token_blocks // (a.publishers * a.blocks_per_event))
        r1b = await _run_phase(plane, lags, {**common, "seed": 2, "prefix": "t", "events_per_publisher": per_pub_t,
                                       "tokens": True, "rate_blocks_per_s": 0},
                               per_pub_t * a.publishers * a.blocks_per_event)
        result["throughput_tokens"] = r1b
        # 2. lag at a fixed offered rate.
        per_pub_l = max(1, int(a.lag_rate * a.lag_seconds) // (a.publishers * a.blocks_per_event))
        r2 = await _run_phase(plane, lags, {**common, "seed": 3, "prefix": "l", "events_per_publisher": per_pub_l,
                                      "tokens": False, "rate_blocks_per_s": a.lag_rate},
                              per_pub_l * a.publishers * a.blocks_per_event)
        result["lag"] = {"offered_blocks_per_s": a.lag_rate, **r2}
        # 3. cold start of a replica: snapshot, then more events, then a fresh replica.
        entries = reg.model(MODEL).index.num_entries()
        t0 = time.perf_counter()
        snap_bytes = await plane.write_snapshots()
        snap_s = time.perf_counter() - t0
        per_pub_c = max(1, a.tail_blocks // (a.publishers * a.blocks_per_event))
        await _run_phase(plane, lags, {**common, "seed": 4, "prefix": "c", "events_per_publisher": per_pub_c,
                                 "tokens": False, "rate_blocks_per_s": 0},
                         per_pub_c * a.publishers * a.blocks_per_event)
        target = reg.model(MODEL).index.num_entries()
        reg_b = Registry()
        reg_b.add_model(MODEL, bs)
        b = make_event_plane(reg_b, a.redis, namespace=ns, num_shards=a.shards, snapshot_interval_s=0,
                             heartbeat_ttl_s=3600.0, xread_count=a.xread_count, replica_id="bench-b")
        assert isinstance(b, RedisPlane)
        t0 = time.perf_counter()
        await b.start()
        t_loaded = time.perf_counter() - t0
        while reg_b.model(MODEL).index.num_entries() < target and time.perf_counter() - t0 < 120:
            await asyncio.sleep(0.002)
        cold = time.perf_counter() - t0
        result["cold_start"] = {"indexed_blocks_at_snapshot": entries, "blocks_after_replay": target,
                                "snapshot_bytes": snap_bytes, "snapshot_write_s": snap_s,
                                "snapshot_loaded_from": b.snapshot_loaded, "start_and_load_s": t_loaded,
                                "caught_up": reg_b.model(MODEL).index.num_entries() >= target,
                                "seconds": cold}
        await b.stop()
    finally:
        await plane.stop()
        c = make_client(RedisConfig(a.redis))
        await delete_namespace(c, ns)
        await c.aclose()
    result["ingest_blocks_per_s"] = result["throughput_hashes"]["blocks_per_s"]
    result["ingest_events_per_s"] = result["throughput_hashes"]["events_per_s"]
    result["ingest_blocks_per_s_tokens"] = result["throughput_tokens"]["blocks_per_s"]
    result["lag_p50_ms"] = result["lag"]["lag_ms"].get("p50")
    result["lag_p99_ms"] = result["lag"]["lag_ms"].get("p99")
    result["cold_start_s_1m_blocks"] = result["cold_start"]["seconds"]
    result["targets"] = {"ingest_blocks_per_s": 500_000, "lag_p99_ms_at_100k": 50, "cold_start_s_1m_blocks": 2}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--publishers", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--blocks-per-event", type=int, default=16)
    p.add_argument("--blocks", type=int, default=None, help="blocks in the throughput run (>= 1M)")
    p.add_argument("--token-blocks", type=int, default=None)
    p.add_argument("--lag-rate", type=float, default=100_000)
    p.add_argument("--lag-seconds", type=float, default=None)
    p.add_argument("--tail-blocks", type=int, default=50_000)
    p.add_argument("--xread-count", type=int, default=4096)
    a = p.parse_args()
    a.blocks = a.blocks or (1_048_576 if a.quick else 4_194_304)
    a.token_blocks = a.token_blocks or (131_072 if a.quick else 1_048_576)
    a.lag_seconds = a.lag_seconds or (5.0 if a.quick else 30.0)
    lags = LagSamples(event_metrics.INGEST_LAG)
    with mock.patch.object(event_metrics, "INGEST_LAG", lags):
        try:
            import uvloop  # the router service runs on uvloop

            result = uvloop.run(main_async(a, lags))
        except ImportError:
            result = asyncio.run(main_async(a, lags))
    rows = [("ingest blocks/s (router hashes)", result["ingest_blocks_per_s"]),
            ("ingest events/s (router hashes)", result["ingest_events_per_s"]),
            ("ingest blocks/s (token ids)", result["ingest_blocks_per_s_tokens"]),
            (f"lag p50 ms at {a.lag_rate:.0f} blocks/s", result["lag_p50_ms"]),
            (f"lag p99 ms at {a.lag_rate:.0f} blocks/s", result["lag_p99_ms"]),
            ("replica cold start s", result["cold_start_s_1m_blocks"])]
    print(table(rows, ["metric", "value"]))
    write_json(a.json, result)


if __name__ == "__main__":
    main()
