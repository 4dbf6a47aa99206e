"""Event plane logic without Redis: the in-process plane (embedded default),
keys, connection config, publisher batching and resync."""

from __future__ import annotations

import asyncio
import time
import zlib

import pytest

from kvrouter._core import decode_payload
from kvrouter.events.codec import encode_payload
from kvrouter.events.inprocess import InProcessPlane
from kvrouter.events.keys import Keys, shard_of
from kvrouter.events.model import LoadReport
from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher, InProcessTransport, OutEntry
from kvrouter.events.redis_conn import RedisConfig, make_client
from kvrouter.events.sink import EventSink
from kvrouter.events.workload import SyntheticCache
from kvrouter.protocol import check_name
from kvrouter.registry import Registry, UnknownModel, WorkerStatus
from tests.event_helpers import held, wait_until

BS = 4




def make_plane(**opts: object) -> tuple[Registry, InProcessPlane]:
    reg = Registry()
    reg.add_model("m", BS)
    plane = make_event_plane(reg, None, heartbeat_ttl_s=opts.pop("heartbeat_ttl_s", 1.0), **opts)
    assert isinstance(plane, InProcessPlane)
    return reg, plane


def test_keys_layout_and_shards() -> None:
    k = Keys("ns1")
    s = k.stream("llama", 3)
    assert s == "ns1:kv:llama:{ns1/llama/3}"
    # One shard's keys share the cluster hash tag; different shards do not.
    assert k.stream_marker("llama", 3).endswith("{ns1/llama/3}")
    assert k.stream("llama", 2) != s
    assert k.heartbeat("llama", "w0") == "ns1:hb:llama:w0"
    assert shard_of("worker-7", 4) == zlib.crc32(b"worker-7") % 4
    assert {shard_of(f"w{i}", 4) for i in range(64)} == {0, 1, 2, 3}
    for bad in ("", "a b", "x{y}", "a" * 201):
        with pytest.raises(ValueError):
            check_name("worker", bad)
    with pytest.raises(ValueError):
        Keys("bad{ns}")
    with pytest.raises(ValueError):
        shard_of("w", 0)


def test_redis_config_options() -> None:
    cfg = RedisConfig.from_options("rediss://user:secret@redis.example:6380/0", tls_ca_file="/ca.pem")
    assert cfg.use_tls and not cfg.is_cluster
    assert "secret" not in cfg.redacted_url()
    assert RedisConfig.from_options("redis+cluster://h:7000").is_cluster
    with pytest.raises(ValueError, match="unknown Redis option"):
        RedisConfig.from_options("redis://h", passwd="x")
    with pytest.raises(ValueError, match="scheme"):
        RedisConfig.from_options("http://h")
    with pytest.raises(ValueError, match="together"):
        RedisConfig.from_options("rediss://h", tls_cert_file="/c.pem")
    with pytest.raises(ValueError, match="sentinel_service"):
        RedisConfig.from_options("redis://h", sentinels=[("h", 26379)])
    # Sentinel: hosts and service from the URL; the client is built without connecting.
    client = make_client(RedisConfig.from_options("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2"))
    kw = client.connection_pool.connection_kwargs
    assert kw["password"] == "pw" and kw["db"] == 2
    with pytest.raises(ValueError, match="unknown event plane option"):
        make_event_plane(Registry(), None, namespce="x")
    with pytest.raises(ValueError, match="without a Redis URL"):
        make_event_plane(Registry(), None, password="x")


def test_inprocess_publish_to_index() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        caches = {f"w{i}": SyntheticCache(BS, seed=i) for i in range(3)}
        pubs = {n: plane.publisher("m", n, block_size=BS, heartbeat_ttl_s=1.0) for n in caches}
        for p in pubs.values():
            await p.start()
        for step in range(300):
            for n, c in caches.items():
                pubs[n].publish(c.step())
            if step % 10 == 0:
                await asyncio.sleep(0)
        for p in pubs.values():
            assert await p.flush()
        assert await wait_until(lambda: all(held(reg, n) == c.router_hashes() for n, c in caches.items()))
        st = plane.stats()
        assert st["entries_applied"] > 3 and st["malformed_total"] == 0 and st["gaps_dump"] == 0
        assert all(w.routable for w in reg.model("m").workers.values())
        # A load report reaches the scheduler.
        pubs["w0"].report_load(LoadReport(running=3, queued=2, kv_used_blocks=10, kv_free_blocks=90))
        wid = reg.worker("m", "w0").wid
        assert await wait_until(lambda: reg.model("m").scheduler.load(wid).reported_queued == 2)
        for p in pubs.values():
            await p.stop()
        # Graceful leave removes workers at once.
        assert await wait_until(lambda: not reg.model("m").workers, timeout=2)
        await plane.stop()

    asyncio.run(run())


def test_inprocess_epoch_restart_clears_worker() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        old = SyntheticCache(BS, seed=1)
        p1 = plane.publisher("m", "w0", block_size=BS)
        await p1.start()
        for _ in range(50):
            p1.publish(old.step())
            await asyncio.sleep(0)
        await p1.flush()
        assert await wait_until(lambda: held(reg, "w0") == old.router_hashes())
        await p1.kill()  # crash: no leave
        new = SyntheticCache(BS, seed=2)
        p2 = plane.publisher("m", "w0", block_size=BS)
        await p2.start()
        for _ in range(20):
            p2.publish(new.step())
            await asyncio.sleep(0)
        await p2.flush()
        assert p2.epoch != p1.epoch
        assert await wait_until(lambda: held(reg, "w0") == new.router_hashes())
        assert plane.stats()["epoch_resets"] >= 1
        await p2.stop()
        await plane.stop()

    asyncio.run(run())


def test_inprocess_gap_asks_worker_for_dump() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        cache = SyntheticCache(BS, seed=3)
        pub = plane.publisher("m", "w0", block_size=BS, dump=cache.dump)
        await pub.start()
        for _ in range(30):
            pub.publish(cache.step())
            await asyncio.sleep(0)
        await pub.flush()
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        first_epoch = pub.epoch
        # Events the router never gets: the cache changes, and a later seq arrives.
        lost = cache.store(5)
        plane.submit("m", "w0", pub.epoch, pub.acked_seq + 3, encode_payload(lost))
        assert await wait_until(lambda: pub.epoch != first_epoch)
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        st = plane.stats()
        assert st["gaps_dump"] == 1 and st["dumps_requested"] >= 1 and st["dumps_received"] >= 1
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_inprocess_bad_input_rejected_and_malformed_counted() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        payload = encode_payload(SyntheticCache(BS, seed=4).store(2))
        with pytest.raises(UnknownModel):
            plane.submit("nope", "w0", "e", 0, payload)
        for args in (("bad worker", "e", 0), ("w0", "", 0), ("w0", "e", -1), ("w0", "e", 1 << 63),
                     ("w0", "x" * 200, 0)):
            with pytest.raises(ValueError):
                plane.submit("m", *args, payload)  # type: ignore[arg-type]
        assert not reg.model("m").workers
        # A malformed payload with a valid envelope is counted and skipped; the entries
        # around it still apply.
        cache = SyntheticCache(BS, seed=5)
        plane.submit("m", "w1", "e1", 0, encode_payload(cache.store(3)))
        plane.submit("m", "w1", "e1", 1, b"\x93garbage")
        good = cache.store(2)
        plane.submit("m", "w1", "e1", 2, encode_payload(good))
        assert await wait_until(lambda: plane.stats()["entries_applied"] == 2)
        assert plane.stats()["malformed"] == {"payload": 1}
        # The router holds both good batches and asked the worker for a resync.
        assert held(reg, "w1") == cache.router_hashes()
        assert plane.stats()["dumps_requested"] == 1
        await plane.stop()

    asyncio.run(run())


def test_inprocess_liveness_lapse_and_return() -> None:
    async def run() -> None:
        reg, plane = make_plane(heartbeat_ttl_s=0.6)
        await plane.start()
        pub = plane.publisher("m", "w0", block_size=BS, heartbeat_ttl_s=0.6)
        await pub.start()
        assert await wait_until(lambda: "w0" in reg.model("m").workers)
        await pub.kill()
        t0 = time.monotonic()
        assert await wait_until(lambda: "w0" not in reg.model("m").workers, timeout=5)
        assert time.monotonic() - t0 < 5
        assert plane.stats()["workers_lapsed"] == 1
        pub2 = plane.publisher("m", "w0", block_size=BS, heartbeat_ttl_s=0.6)
        await pub2.start()
        assert await wait_until(lambda: "w0" in reg.model("m").workers and reg.worker("m", "w0").routable)
        await pub2.stop()
        await plane.stop()

    asyncio.run(run())


class RecordingTransport(InProcessTransport):
    """The in-process transport, keeping every entry it delivered."""

    def __init__(self, sink: EventSink) -> None:
        super().__init__(sink)
        self.sent: list[OutEntry] = []

    async def send(self, model: str, worker: str, entries: list[OutEntry]) -> None:
        self.sent.extend(entries)
        await super().send(model, worker, entries)


def _blocks(entry: OutEntry) -> list[int]:
    """Blocks per event of an entry (AllCleared counts as one, as the publisher counts)."""
    out = []
    for ev in decode_payload(entry.payload):
        hashes = ev[1] if ev[0] in ("stored", "removed") else (None,)
        assert isinstance(hashes, list | tuple)
        out.append(len(hashes))
    return out


def test_publisher_chunks_large_batches() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        cache = SyntheticCache(BS, seed=6, max_blocks=100_000, max_run=64)
        rec = RecordingTransport(plane)
        pub = EventPublisher(rec, "m", "w0", block_size=BS, max_blocks_per_entry=100)
        await pub.start()
        assert await pub.flush()
        start = len(rec.sent)  # the epoch's opening entry (AllCleared)
        # One call, so the publisher chunks all 40 events (1200 blocks) at once.
        pub.publish([ev for _ in range(40) for ev in cache.store(30)])
        big = cache.store(150)  # one event over the limit: alone, never split
        pub.publish(big)
        assert await pub.flush()
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        entries = [_blocks(e) for e in rec.sent[start:]]
        assert sum(map(sum, entries)) == 40 * 30 + 150
        # At most 100 blocks per entry: three 30-block events each (the 14th holds the
        # last one), then the 150-block event in an entry of its own.
        assert entries == [[30, 30, 30]] * 13 + [[30], [150]]
        assert [e.seq for e in rec.sent[start:]] == list(range(start, start + 15))
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_request_resync_starts_a_new_epoch_with_the_dump() -> None:
    async def run() -> None:
        reg, plane = make_plane()
        await plane.start()
        cache = SyntheticCache(BS, seed=9, max_blocks=1000, max_run=8)
        pub = plane.publisher("m", "w0", block_size=BS, dump=cache.dump)
        await pub.start()
        pub.publish(cache.store(8))
        assert await pub.flush()
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        epoch = pub.epoch
        pub.request_resync("adapter lost events")
        assert await pub.flush()
        assert pub.epoch != epoch and pub.stats.resyncs == 1
        assert await wait_until(lambda: plane.core.tracks[("m", "w0")].epoch == pub.epoch)
        # The new epoch opens with AllCleared; the dump's entries follow it, so the
        # index may be empty for a moment after the epoch changes.
        assert await wait_until(lambda: held(reg, "w0") == cache.router_hashes())
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_load_report_held_by_the_rate_cap_goes_out_when_the_cap_allows() -> None:
    """A report arriving within load_interval_s of the previous one is sent once the cap
    allows, not a heartbeat interval later (here 20 s: the wait below is far shorter)."""
    async def run() -> None:
        reg, plane = make_plane(heartbeat_ttl_s=60.0)
        await plane.start()
        pub = plane.publisher("m", "w0", block_size=BS, heartbeat_ttl_s=60.0,
                              load_interval_s=0.3)
        await pub.start()
        assert await wait_until(lambda: "w0" in reg.model("m").workers)

        def running() -> int:
            st = reg.model("m")
            return int(st.scheduler.load(st.workers["w0"].wid).reported_running)

        pub.report_load(LoadReport(running=3, queued=0, kv_used_blocks=1, kv_free_blocks=9))
        assert await wait_until(lambda: running() == 3, timeout=8)
        # Right after a report was sent: within the cap. Then the engine goes idle.
        pub.report_load(LoadReport(running=0, queued=0, kv_used_blocks=1, kv_free_blocks=9))
        assert await wait_until(lambda: running() == 0, timeout=8)
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_suspended_publisher_leaves_and_resume_returns() -> None:
    async def run() -> None:
        reg, plane = make_plane(heartbeat_ttl_s=30.0)
        await plane.start()
        pub = plane.publisher("m", "w0", block_size=BS, heartbeat_ttl_s=30.0)
        await pub.start()
        assert await wait_until(lambda: "w0" in reg.model("m").workers)
        pub.suspend()
        assert await wait_until(lambda: "w0" not in reg.model("m").workers)
        pub.resume()
        assert await wait_until(lambda: "w0" in reg.model("m").workers
                                and reg.worker("m", "w0").routable)
        await pub.stop()
        await plane.stop()

    asyncio.run(run())


def test_mismatch_clears_when_the_worker_returns_with_a_compatible_block_size() -> None:
    async def run() -> None:
        reg, plane = make_plane(heartbeat_ttl_s=30.0)
        await plane.start()
        odd = plane.publisher("m", "w0", block_size=BS + 2, heartbeat_ttl_s=30.0,
                              extra_meta={"engine": "x", "version": "1"})
        await odd.start()
        assert await wait_until(lambda: "w0" in reg.model("m").workers
                                and reg.worker("m", "w0").status is WorkerStatus.MISMATCH)
        assert not reg.worker("m", "w0").routable
        await odd.kill()  # restarts (no goodbye) with a block size the model can index
        ok = plane.publisher("m", "w0", block_size=2 * BS, heartbeat_ttl_s=30.0,
                             extra_meta={"engine": "x", "version": "2"})
        await ok.start()
        assert await wait_until(lambda: reg.worker("m", "w0").status is WorkerStatus.UP)
        info = reg.worker("m", "w0")
        assert info.routable and info.status_reason == ""
        # Heartbeat metadata that changed is refreshed too.
        assert info.metadata["version"] == "2" and info.metadata["block_size"] == str(2 * BS)
        await ok.stop()
        await plane.stop()

    asyncio.run(run())


def test_upsert_makes_a_down_worker_up_without_its_old_reason() -> None:
    reg = Registry()
    reg.add_model("m", BS)
    reg.upsert_worker("m", "w")
    reg.set_status("m", "w", WorkerStatus.DOWN, "awaiting heartbeat")
    info = reg.upsert_worker("m", "w")
    assert (info.status, info.status_reason, info.routable) == (WorkerStatus.UP, "", True)
    # MISMATCH is not the registry's to clear: only a heartbeat with a good block size is.
    reg.set_status("m", "w", WorkerStatus.MISMATCH, "block size 6")
    assert reg.upsert_worker("m", "w").status is WorkerStatus.MISMATCH
