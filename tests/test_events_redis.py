"""Event plane against the real Redis on 127.0.0.1:6379 (one namespace per test,
deleted afterwards): publish -> index, gap repair (stream and dump), epochs,
liveness, replicas, malformed input."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis

from kvrouter._core import decode_payload
from kvrouter.events.codec import encode_payload
from kvrouter.events.keys import Keys
from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.events.redis_conn import RedisConfig, delete_namespace, make_client
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.events.wire import entry_fields
from kvrouter.events.workload import SyntheticCache
from kvrouter.registry import Registry
from tests.conftest import REDIS_URL
from tests.event_helpers import all_equal, churn, held, wait_until

URL = REDIS_URL
BS = 4

pytestmark = pytest.mark.usefixtures("redis_url")  # fails, never skips, without Redis


@pytest.fixture
def ns() -> Iterator[str]:
    name = "kvrtest-" + uuid.uuid4().hex[:10]
    yield name

    async def cleanup() -> None:
        c = make_client(RedisConfig(URL))
        await delete_namespace(c, name)
        await c.aclose()

    asyncio.run(cleanup())
    assert not redis.Redis.from_url(URL).keys(f"{name}:*")




def router(ns: str, **opts: Any) -> tuple[Registry, RedisPlane]:
    reg = Registry()
    reg.add_model("m", BS)
    opts.setdefault("heartbeat_ttl_s", 1.0)
    opts.setdefault("snapshot_interval_s", 0)
    plane = make_event_plane(reg, URL, namespace=ns, **opts)
    assert isinstance(plane, RedisPlane)
    return reg, plane


def worker(ns: str, name: str, cache: SyntheticCache, shards: int = 1, **opts: Any) -> EventPublisher:
    opts.setdefault("heartbeat_ttl_s", 1.0)
    return redis_publisher(URL, "m", name, namespace=ns, num_shards=shards, block_size=BS,
                           dump=cache.dump, **opts)


def test_publish_to_index_end_to_end(ns: str) -> None:
    async def run() -> None:
        reg, plane = router(ns, num_shards=2)
        await plane.start()
        caches = {f"w{i}": SyntheticCache(BS, seed=i) for i in range(6)}
        pubs = {n: worker(ns, n, c, shards=2, address=f"10.0.0.{i}:8000")
                for i, (n, c) in enumerate(caches.items())}
        for p in pubs.values():
            await p.start()
        await churn(pubs, caches, 200)
        assert await wait_until(lambda: all_equal(reg, caches))
        st = plane.stats()
        assert st["malformed_total"] == 0 and st["gaps_dump"] == 0 and st["gaps_stream"] == 0
        assert await wait_until(lambda: all(w.routable for w in reg.model("m").workers.values()))
        assert reg.worker("m", "w2").address == "10.0.0.2:8000"
        # Both shard streams were used.
        c = redis.Redis.from_url(URL)
        assert all(c.xlen(Keys(ns).stream("m", s)) > 0 for s in range(2))
        for p in pubs.values():
            await p.stop()
        assert await wait_until(lambda: not reg.model("m").workers, timeout=3)
        await plane.stop()

    asyncio.run(run())


def test_gap_repaired_from_stream_after_lapse(ns: str) -> None:
    """A worker whose heartbeats come late lapses (leaves the index and routing);
    when it beats again the router rebuilds its state by re-reading the stream."""

    async def run() -> None:
        reg, plane = router(ns, heartbeat_ttl_s=1.0)
        await plane.start()
        cache = SyntheticCache(BS, seed=11)
        # Beats every 2.5 s while the router's TTL is 1 s.
        pub = worker(ns, "w0", cache, heartbeat_ttl_s=5.0, heartbeat_interval_s=2.5)
        await pub.start()
        await churn({"w0": pub}, {"w0": cache}, 60)
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        assert await wait_until(lambda: "w0" not in reg.model("m").workers, timeout=5)
        assert plane.stats()["workers_lapsed"] == 1
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes(), timeout=10)
        st = plane.stats()
        assert st["gaps_stream"] >= 1, str(st)
        assert st["gaps_dump"] == 0 and st["dumps_requested"] == 0
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_gap_repaired_by_full_dump_when_stream_trimmed(ns: str) -> None:
    async def run() -> None:
        cache = SyntheticCache(BS, seed=12)
        pub = worker(ns, "w0", cache)
        await pub.start()
        await churn({"w0": pub}, {"w0": cache}, 80)
        epoch = pub.epoch
        # The stream's head is trimmed away before any router read it.
        stream = Keys(ns).stream("m", 0)
        c = redis.Redis.from_url(URL)
        ids = [e[0] for e in c.xrange(stream)]
        assert len(ids) > 4
        c.xtrim(stream, minid=ids[len(ids) // 2], approximate=False)
        reg, plane = router(ns)
        await plane.start()
        assert await wait_until(lambda: pub.epoch != epoch)
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        st = plane.stats()
        assert st["gaps_dump"] >= 1 and st["dumps_requested"] >= 1 and st["dumps_received"] >= 1
        # Later events still apply on top of the dump.
        await churn({"w0": pub}, {"w0": cache}, 30)
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_epoch_restart_replaces_worker_state(ns: str) -> None:
    async def run() -> None:
        reg, plane = router(ns)
        await plane.start()
        old = SyntheticCache(BS, seed=13)
        p1 = worker(ns, "w0", old)
        await p1.start()
        await churn({"w0": p1}, {"w0": old}, 50)
        assert await wait_until(lambda: held(reg, "w0") == old.router_hashes())
        await p1.kill()
        new = SyntheticCache(BS, seed=14)
        p2 = redis_publisher(URL, "m", "w0", namespace=ns, block_size=BS, heartbeat_ttl_s=1.0)
        await p2.start()
        await churn({"w0": p2}, {"w0": new}, 30)
        assert await wait_until(lambda: held(reg, "w0") == new.router_hashes())
        assert plane.stats()["epoch_resets"] >= 1
        await p2.stop()
        await plane.stop()

    asyncio.run(run())


def test_heartbeat_lapse_removes_worker_and_it_returns(ns: str) -> None:
    async def run() -> None:
        reg, plane = router(ns, heartbeat_ttl_s=1.0)
        await plane.start()
        caches = {"w0": SyntheticCache(BS, seed=15), "w1": SyntheticCache(BS, seed=16)}
        pubs = {n: worker(ns, n, c) for n, c in caches.items()}
        for p in pubs.values():
            await p.start()
        await churn(pubs, caches, 40)
        assert await wait_until(lambda: all_equal(reg, caches))
        await pubs["w0"].kill()  # dies without saying goodbye
        t0 = time.monotonic()
        assert await wait_until(lambda: "w0" not in reg.model("m").workers, timeout=6)
        lapse_s = time.monotonic() - t0
        assert "w1" in reg.model("m").workers and reg.worker("m", "w1").routable
        # Its blocks left the index with it.
        assert reg.model("m").index.num_entries() == len(caches["w1"].router_hashes())
        # Comes back (same cache kept by the engine): it is routable again, state dumped.
        pubs["w0"] = worker(ns, "w0", caches["w0"])
        await pubs["w0"].start()
        assert await wait_until(lambda: all_equal(reg, caches) and reg.worker("m", "w0").routable)
        assert lapse_s < 6
        for p in pubs.values():
            await p.stop()
        await plane.stop()

    asyncio.run(run())


def test_two_replicas_converge_and_share_reservations(ns: str) -> None:
    async def run() -> None:
        reg_a, a = router(ns, replica_id="ra", reservation_interval_s=0.1)
        reg_b, b = router(ns, replica_id="rb", reservation_interval_s=0.1)
        await a.start()
        caches = {f"w{i}": SyntheticCache(BS, seed=20 + i) for i in range(3)}
        pubs = {n: worker(ns, n, c) for n, c in caches.items()}
        for p in pubs.values():
            await p.start()
        await churn(pubs, caches, 60)
        await b.start()  # joins late: reads the history
        await churn(pubs, caches, 60)
        assert await wait_until(lambda: all_equal(reg_a, caches) and all_equal(reg_b, caches))
        wa, wb = reg_a.worker("m", "w1").wid, reg_b.worker("m", "w1").wid
        reg_a.model("m").scheduler.reserve(wa, "req-1", prefill_tokens=300, decode_blocks=7)
        sched_b = reg_b.model("m").scheduler
        assert await wait_until(lambda: sched_b.load(wb).external_prefill_tokens == 300, timeout=5)
        ld = sched_b.load(wb)
        assert ld.external_decode_blocks == 7 and ld.external_requests == 1
        # A's own view does not count its own reservation twice.
        assert reg_a.model("m").scheduler.load(wa).external_requests == 0
        reg_a.model("m").scheduler.release("req-1")
        assert await wait_until(lambda: sched_b.load(wb).external_requests == 0, timeout=5)
        # A replica that stops withdraws its totals.
        reg_a.model("m").scheduler.reserve(wa, "req-2", prefill_tokens=50, decode_blocks=1)
        assert await wait_until(lambda: sched_b.load(wb).external_requests == 1, timeout=5)
        await a.stop()
        assert await wait_until(lambda: sched_b.load(wb).external_requests == 0, timeout=5)
        for p in pubs.values():
            await p.stop()
        await b.stop()

    asyncio.run(run())


def _fuzz_payload(rng: random.Random, valid: list[bytes]) -> bytes:
    """A payload the decoder rejects: random bytes, truncated, extended or bit-flipped
    valid payloads (those that still decode are regenerated)."""
    while True:
        kind = rng.randrange(5)
        base = rng.choice(valid)
        if kind == 0:
            p = bytes([rng.choice([0xC1, 0x01, 0xA3, 0x80, 0xC0])]) + rng.randbytes(rng.randrange(0, 64))
        elif kind == 1:
            p = base[: rng.randrange(0, len(base))]
        elif kind == 2:
            p = base + rng.randbytes(rng.randrange(1, 8))
        elif kind == 3:
            b = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            p = bytes(b)
        else:
            p = msgpack.packb(rng.choice([{"type": "stored"}, [{"type": "nope"}], [{"type": "removed",
                              "hashes": "x"}], [1, 2], [{"type": "stored", "hashes": [1], "tokens": b"\x00",
                                                     "block_size": 4}]]))
        try:
            decode_payload(p)
        except ValueError:
            return p


def _fuzz_envelope(rng: random.Random, payload: bytes) -> dict[bytes, bytes]:
    good = {b"worker": b"fz", b"epoch": b"e", b"seq": b"1", b"payload": payload}
    kind = rng.randrange(6)
    if kind == 0:
        del good[rng.choice(list(good))]
    elif kind == 1:
        good[b"seq"] = rng.choice([b"-1", b"x", b"1e3", b"99999999999999999999", b""])
    elif kind == 2:
        good[b"worker"] = rng.choice([b"", b"a b", b"{x}", b"\xff\xfe", b"w" * 300])
    elif kind == 3:
        good[b"epoch"] = rng.choice([b"", b"e" * 200, b"\xc3\x28"])
    elif kind == 4:
        good = {rng.randbytes(3): rng.randbytes(5) for _ in range(rng.randrange(1, 5))}
    else:
        good[b"payload"] = b"x" * 70_000  # over the router's payload limit (oversize)
    return good


def test_malformed_entries_counted_and_skipped(ns: str) -> None:
    n_bad = int(os.environ.get("KVR_FUZZ_N", "100000"))

    async def run() -> None:
        reg, plane = router(ns, max_payload_bytes=65_536, xread_count=8192)
        await plane.start()

        async def beat() -> None:  # the valid worker is alive (gRPC-style heartbeats)
            while True:
                plane.submit_heartbeat("m", "good", block_size=BS)
                await asyncio.sleep(0.2)

        beater = asyncio.create_task(beat())
        rng = random.Random(7)
        cache = SyntheticCache(BS, seed=30)
        valid = [encode_payload(cache.step()) for _ in range(50)]
        sample = SyntheticCache(BS, seed=31)
        samples = [encode_payload(sample.step()) for _ in range(20)]
        stream = Keys(ns).stream("m", 0)
        c = redis.Redis.from_url(URL)
        expected: dict[str, int] = {"envelope": 0, "payload": 0, "oversize": 0}
        fuzz_seq = {f"fz{i}": 0 for i in range(4)}
        good_at = sorted(rng.sample(range(n_bad), len(valid)))
        gi = 0
        pipe = c.pipeline(transaction=False)
        for i in range(n_bad):
            while gi < len(valid) and good_at[gi] == i:
                pipe.xadd(stream, entry_fields("good", "g1", gi, valid[gi]))  # type: ignore[arg-type]
                gi += 1
            payload = _fuzz_payload(rng, samples)
            if rng.random() < 0.5:
                # Valid envelope of a fuzz worker, malformed payload.
                w = rng.choice(list(fuzz_seq))
                pipe.xadd(stream, entry_fields(w, "fe", fuzz_seq[w], payload))  # type: ignore[arg-type]
                fuzz_seq[w] += 1
                expected["payload"] += 1
            else:
                fields = _fuzz_envelope(rng, payload)
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
                big = fields.get(b"payload") == b"x" * 70_000
                expected["oversize" if big else "envelope"] += 1
            if len(pipe) >= 2000:
                pipe.execute()
                await asyncio.sleep(0)
        pipe.execute()
        assert await wait_until(
            lambda: sum(plane.stats()["malformed"].values()) >= n_bad, timeout=120)
        st = plane.stats()
        assert {k: v for k, v in st["malformed"].items() if v} == {k: v for k, v in expected.items() if v}
        # Valid entries around them were applied, and the router keeps working.
        assert held(reg, "good") == cache.router_hashes()
        assert st["entries_applied"] == len(valid)
        more = cache.store(3)
        c.xadd(stream, entry_fields("good", "g1", len(valid), encode_payload(more)))  # type: ignore[arg-type]
        assert await wait_until(lambda: held(reg, "good") == cache.router_hashes())
        # Fuzz workers never heartbeat: not routable.
        assert [w.name for w in reg.model("m").workers.values() if w.routable] == ["good"]
        beater.cancel()
        await plane.stop()

    asyncio.run(run())


def test_worker_seen_from_events_first_then_heartbeats_is_up_and_fresh(ns: str) -> None:
    """Events before the first heartbeat register the worker DOWN ("awaiting heartbeat");
    the heartbeat makes it UP with no stale reason, and every heartbeat refreshes the
    last_seen that ListWorkers shows."""
    async def run() -> None:
        reg, plane = router(ns)
        await plane.start()
        cache = SyntheticCache(BS, seed=21, max_blocks=1000, max_run=8)
        client = make_client(RedisConfig(URL))
        stream = Keys(ns).stream("m", 0)
        await client.xadd(stream, entry_fields("w0", "e-old", 0, encode_payload(cache.store(4)),
                                               time.time(), ""))
        assert await wait_until(lambda: "w0" in reg.model("m").workers)
        info = reg.worker("m", "w0")
        assert not info.routable and info.status_reason == "awaiting heartbeat"

        pub = worker(ns, "w0", cache)
        await pub.start()
        assert await wait_until(lambda: reg.worker("m", "w0").routable)
        assert reg.worker("m", "w0").status_reason == ""
        for _ in range(2):
            seen = reg.worker("m", "w0").last_seen
            assert await wait_until(lambda s=seen: reg.worker("m", "w0").last_seen > s)  # type: ignore[misc]
        await pub.stop()
        await client.aclose()
        await plane.stop()

    asyncio.run(run())
