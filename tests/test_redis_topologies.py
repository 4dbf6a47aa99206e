"""The event plane on real Redis topologies (issue 13, item 4), each started by the test
from plain redis-server processes (kvrouter.testing.redis_topologies):

- Sentinel: the primary is SIGKILLed while three workers publish; publishers and the
  router follow Sentinel to the promoted replica and the router's index ends equal to
  every worker's truth.
- Cluster: three primaries; shard streams spread over the nodes through their hash
  tags; the index equals the truth.
- TLS: a TLS-only redis-server; the router and publishers connect with the CA file.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.events.workload import SyntheticCache
from kvrouter.registry import Registry
from kvrouter.testing.redis_topologies import ClusterSetup, SentinelSetup, TlsRedis
from tests.event_helpers import all_equal, churn, wait_until

BS = 4


@pytest.fixture(autouse=True)
def _redis_tools_installed() -> None:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH; scripts/ensure_redis.sh installs it", pytrace=False)


def _publishers(url: str, ns: str, caches: dict[str, SyntheticCache], **opts: Any) -> dict[str, EventPublisher]:
    opts.setdefault("heartbeat_ttl_s", 1.0)
    return {n: redis_publisher(url, "m", n, namespace=ns, block_size=BS, dump=c.dump, **opts)
            for n, c in caches.items()}


async def _converge(url: str, workers: int, *, fault: Any = None, num_shards: int = 1,
                    **redis_opts: Any) -> dict[str, Any]:
    """Publish churn from `workers` synthetic workers to a router plane on `url`; while
    they keep publishing, run `fault()` (if given); return the plane's stats once the
    index equals every worker's truth again."""
    ns = "kvrtopo-" + uuid.uuid4().hex[:8]
    reg = Registry()
    reg.add_model("m", BS)
    plane = make_event_plane(reg, url, namespace=ns, heartbeat_ttl_s=2.0, snapshot_interval_s=0,
                             num_shards=num_shards, socket_timeout_s=1.0, connect_timeout_s=0.5,
                             **redis_opts)
    assert isinstance(plane, RedisPlane)
    await plane.start()
    caches = {f"w{i}": SyntheticCache(BS, seed=70 + i) for i in range(workers)}
    pubs = _publishers(url, ns, caches, num_shards=num_shards, max_buffer_events=20_000,
                       socket_timeout_s=1.0, connect_timeout_s=0.5, **redis_opts)
    try:
        for p in pubs.values():
            await p.start()
        await churn(pubs, caches, 60)
        assert await wait_until(lambda: all_equal(reg, caches), timeout=30)
        if fault is not None:
            stop = asyncio.Event()

            async def keep_publishing() -> None:
                while not stop.is_set():
                    for n, c in caches.items():
                        pubs[n].publish(c.step())
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(keep_publishing())
            before = plane.stats()["entries_applied"]
            assert await wait_until(lambda: plane.stats()["entries_applied"] > before + 20)
            await asyncio.to_thread(fault)
            at_fault = plane.stats()["entries_applied"]
            # The stream flows again after the fault, then publishing stops.
            assert await wait_until(lambda: plane.stats()["entries_applied"] > at_fault + 20, timeout=45)
            stop.set()
            await task
        for p in pubs.values():
            assert await p.flush(20)
        assert await wait_until(lambda: all_equal(reg, caches), timeout=45)
        assert await wait_until(lambda: all(w.routable for w in reg.model("m").workers.values()), timeout=20)
        return dict(plane.stats())
    finally:
        for p in pubs.values():
            await p.stop()
        await plane.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    s = SentinelSetup(tmp_path / "sentinel").start()
    yield s
    s.stop()


def test_sentinel_failover_under_load(sentinel: SentinelSetup) -> None:
    old = sentinel.primary()

    def fail_over() -> None:
        sentinel.kill_primary()
        # Sentinel notices (down-after 500 ms) and promotes the replica.
        from kvrouter.testing.wait import wait_until as sync_wait

        sync_wait(lambda: sentinel.primary() != old, 30, what="sentinel failover", ignore=(OSError,))

    stats = asyncio.run(_converge(sentinel.url, 3, fault=fail_over))
    assert sentinel.primary() != old
    assert stats["entries_applied"] > 0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    c = ClusterSetup(tmp_path / "cluster").start()
    yield c
    c.stop()


def test_cluster_three_primaries(cluster: ClusterSetup) -> None:
    asyncio.run(_converge(cluster.url, 4, num_shards=6))
    # Hash-tagged shard keys spread over the primaries rather than piling on one.
    assert sum(1 for n in cluster.keys_per_node() if n > 0) >= 2, cluster.keys_per_node()


def _make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "1", "-subj", "/CN=kvrouter-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


def test_tls_redis(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH", pytrace=False)
    ca, cert, key = _make_certs(tmp_path / "certs")
    server = TlsRedis(tmp_path / "tls", ca, cert, key).start()
    try:
        asyncio.run(_converge(server.url, 2, tls_ca_file=str(ca)))
        # The same server named by a redis:// URL with tls=True.
        plain = server.url.replace("rediss://", "redis://")
        asyncio.run(_converge(plain, 2, tls=True, tls_ca_file=str(ca)))
    finally:
        server.stop()
