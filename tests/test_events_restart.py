"""Failures: Redis restarted with its data lost (a private redis-server), a router
process SIGKILLed and restarted from a snapshot, a publisher whose Redis is away."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvrouter.events.keys import Keys
from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.events.redis_conn import RedisConfig, delete_namespace, make_client
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.events.workload import SyntheticCache
from kvrouter.registry import Registry
from kvrouter.testing.processes import ChildProcess, free_port, start_redis_server, stop_children
from tests.conftest import REDIS_URL as URL
from tests.event_helpers import all_equal, churn, wait_until

BS = 4


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    """These tests start redis-server processes of their own; the test command installs
    it (scripts/ensure_redis.sh), so its absence fails them rather than skipping them."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH; scripts/ensure_redis.sh installs it", pytrace=False)


class PrivateRedis:
    """A throwaway redis-server without persistence on a port of its own: a restart
    (kill, then start) loses everything."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.proc: ChildProcess | None = None

    def start(self) -> None:
        self.proc = start_redis_server(self.port, self.log_path, timeout=10)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path / "redis.log")
    r.start()
    yield r
    r.kill()


def publishers(url: str, ns: str, caches: dict[str, SyntheticCache], **opts: Any) -> dict[str, EventPublisher]:
    opts.setdefault("heartbeat_ttl_s", 1.0)
    return {n: redis_publisher(url, "m", n, namespace=ns, block_size=BS, dump=c.dump, **opts)
            for n, c in caches.items()}


def test_redis_restart_with_data_loss(private_redis: PrivateRedis) -> None:
    async def run() -> None:
        ns = "kvrtest-" + uuid.uuid4().hex[:8]
        reg = Registry()
        reg.add_model("m", BS)
        plane = make_event_plane(reg, private_redis.url, namespace=ns, heartbeat_ttl_s=1.0,
                                 snapshot_interval_s=0, socket_timeout_s=1.0, connect_timeout_s=0.5)
        assert isinstance(plane, RedisPlane)
        await plane.start()
        caches = {f"w{i}": SyntheticCache(BS, seed=40 + i) for i in range(3)}
        pubs = publishers(private_redis.url, ns, caches, max_buffer_events=5000)
        for p in pubs.values():
            await p.start()
        await churn(pubs, caches, 100)
        assert await wait_until(lambda: all_equal(reg, caches))
        # Live before the outage (their heartbeats were seen), so the check at the end
        # shows that the outage and the data loss made none of them unroutable.
        assert await wait_until(lambda: all(w.routable for w in reg.model("m").workers.values()))
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            while not stop.is_set():
                for n, c in caches.items():
                    pubs[n].publish(c.step())
                await asyncio.sleep(0.005)

        def applied() -> int:
            return int(plane.stats()["entries_applied"])

        def written() -> int:
            return sum(p.stats.entries for p in pubs.values())

        task = asyncio.create_task(keep_publishing())
        before = applied()
        assert await wait_until(lambda: applied() > before + 20)  # the stream is flowing
        private_redis.kill()  # mid-stream: what was not yet read is gone with it
        # Both sides noticed: the router's reader and every publisher's writes fail.
        assert await wait_until(lambda: plane.stats()["redis_down"])
        errors = {n: p.stats.send_errors for n, p in pubs.items()}
        assert await wait_until(lambda: all(p.stats.send_errors > errors[n] for n, p in pubs.items()))
        private_redis.start()
        # The router found the loss, and the publishers write to the new Redis again.
        assert await wait_until(lambda: plane.stats()["data_losses"] >= 1)
        at_restart = written()
        assert await wait_until(lambda: written() > at_restart + 20)
        stop.set()
        await task
        for p in pubs.values():
            assert await p.flush(10)
        # The router reconnected, noticed the loss and resynced every worker.
        assert await wait_until(lambda: all_equal(reg, caches), timeout=30)
        st = plane.stats()
        assert st["data_losses"] >= 1
        assert all(w.routable for w in reg.model("m").workers.values())
        for p in pubs.values():
            await p.stop()
        await plane.stop()

    asyncio.run(run())


def test_publisher_buffer_overflow_resyncs_when_redis_returns(tmp_path: Path) -> None:
    async def run() -> None:
        r = PrivateRedis(tmp_path / "redis.log")  # not started: Redis is away
        ns = "kvrtest-" + uuid.uuid4().hex[:8]
        cache = SyntheticCache(BS, seed=50)
        pub = redis_publisher(r.url, "m", "w0", namespace=ns, block_size=BS, dump=cache.dump,
                              max_buffer_events=100, heartbeat_ttl_s=1.0, retry_backoff_max_s=0.1,
                              socket_timeout_s=0.5, connect_timeout_s=0.2)
        await pub.start()
        for _ in range(300):
            pub.publish(cache.step())
            await asyncio.sleep(0)
        assert pub.stats.dropped_events > 0 and pub.buffered_events <= 100
        r.start()
        try:
            reg = Registry()
            reg.add_model("m", BS)
            plane = make_event_plane(reg, r.url, namespace=ns, heartbeat_ttl_s=1.0, snapshot_interval_s=0)
            await plane.start()
            assert await pub.flush(10)
            assert await wait_until(lambda: all_equal(reg, {"w0": cache}))
            assert pub.stats.resyncs >= 1
            await pub.stop()
            await plane.stop()
        finally:
            r.kill()

    asyncio.run(run())


def _start_router(url: str, ns: str, replica: str, state: Path, log: Path) -> ChildProcess:
    cmd = [sys.executable, "-m", "kvrouter.events", "--redis", url, "--namespace", ns,
           "--model", f"m:{BS}", "--replica-id", replica, "--heartbeat-ttl", "2",
           "--snapshot-interval", "0.5", "--snapshot-min-retention", "0",
           "--state-file", str(state), "--state-interval", "0.1"]
    return ChildProcess(f"event plane {replica}", cmd, log).start()


def _state(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _matches(state: dict[str, Any], caches: dict[str, SyntheticCache]) -> bool:
    workers = state.get("models", {}).get("m", {})
    return all(n in workers and set(workers[n]["hashes"]) == c.router_hashes()
               for n, c in caches.items())


def test_router_sigkill_restarts_from_snapshot(tmp_path: Path) -> None:
    ns = "kvrtest-" + uuid.uuid4().hex[:8]
    procs: list[ChildProcess] = []

    async def run() -> None:
        caches = {f"w{i}": SyntheticCache(BS, seed=60 + i) for i in range(3)}
        pubs = publishers(URL, ns, caches, heartbeat_ttl_s=2.0)
        for p in pubs.values():
            await p.start()
        state_a = tmp_path / "a.json"
        a = _start_router(URL, ns, "ra", state_a, tmp_path / "a.log")
        procs.append(a)
        await churn(pubs, caches, 150)
        assert await wait_until(lambda: _matches(_state(state_a), caches), timeout=20), a.logs()
        written = _state(state_a)["stats"]["snapshots_written"]
        assert await wait_until(lambda: _state(state_a)["stats"]["snapshots_written"] >= written + 2)
        a.kill()
        await churn(pubs, caches, 50)  # events while no router runs
        # The snapshot let the stream be trimmed: its history alone is no longer enough.
        stream = Keys(ns).stream("m", 0)
        c = redis.Redis.from_url(URL)
        first_id = c.xrange(stream, count=1)[0][0]
        total = sum(p.stats.entries for p in pubs.values())
        assert c.xlen(stream) < total
        state_b = tmp_path / "b.json"
        b = _start_router(URL, ns, "rb", state_b, tmp_path / "b.log")
        procs.append(b)
        assert await wait_until(lambda: _matches(_state(state_b), caches), timeout=20), b.logs()
        st = _state(state_b)["stats"]
        assert st["snapshot_loaded"] == {"m": "ra"}
        assert st["gaps_dump"] == 0 and st["dumps_requested"] == 0
        assert first_id
        for p in pubs.values():
            await p.stop()

    try:
        asyncio.run(run())
    finally:
        stop_children(procs)

        async def cleanup() -> None:
            cl = make_client(RedisConfig(URL))
            await delete_namespace(cl, ns)
            await cl.aclose()

        asyncio.run(cleanup())
