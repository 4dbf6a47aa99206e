"""Authenticated events through Redis (issue 13 findings 1 and 2): per-worker keys and an
HMAC over each stream entry and heartbeat field, and Redis ACL users per role, against a
private redis-server with ACLs and a real `kvrouter serve` reading it."""

from __future__ import annotations

import asyncio
import secrets
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kvrouter.client import RouterClient
from kvrouter.events.codec import encode_payload
from kvrouter.events.keys import Keys
from kvrouter.events.model import AllCleared, BlockStored
from kvrouter.events.publisher import redis_publisher
from kvrouter.events.wire import F_SIG, H_META, HB_SIG, encode_meta, entry_fields, entry_signed_parts
from kvrouter.security.redis_acl import router_rules, worker_rules
from kvrouter.security.signing import Signer, SigningError, WorkerKeys, derive_worker_key
from kvrouter.testing.processes import ChildProcess, RouterProcess, free_port, start_redis_server, start_router
from kvrouter.testing.wait import wait_until

NS = "sig"
MODEL = "default"


@dataclass
class Fleet:
    port: int
    secret: bytes
    passwords: dict[str, str]
    router: RouterProcess
    admin: redis.Redis

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def as_user(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))

    def key(self, worker: str) -> bytes:
        return derive_worker_key(self.secret, MODEL, worker)

    def cached(self, worker: str) -> int:
        with RouterClient(self.router.target) as c:
            return next((w.cached_blocks for w in c.list_workers() if w.name == worker), -1)

    def workers(self) -> list[str]:
        with RouterClient(self.router.target) as c:
            return [w.name for w in c.list_workers()]

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.router.metrics_port}/metrics",
                                      timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("signed")
    port = free_port()
    server: ChildProcess = start_redis_server(port, work / "redis.log")
    admin = redis.Redis(port=port)
    passwords = {u: secrets.token_hex(16) for u in ("kvrouter-router", "w0", "w1")}
    admin.execute_command("ACL", "SETUSER", "kvrouter-router",
                          *router_rules(NS, passwords["kvrouter-router"]))
    for w in ("w0", "w1"):
        admin.execute_command("ACL", "SETUSER", w, *worker_rules(NS, MODEL, w, passwords[w]))
    admin_pw = secrets.token_hex(16)  # the test's own administrator; nobody else is one
    admin.execute_command("ACL", "SETUSER", "admin", "on", f">{admin_pw}", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    admin = redis.Redis(port=port, username="admin", password=admin_pw)
    secret = secrets.token_bytes(32)
    (work / "secret").write_text(secret.hex())
    rp = start_router(work, {"router": {
        "redis_url": f"redis://kvrouter-router:{passwords['kvrouter-router']}@127.0.0.1:{port}/0",
        "event_plane": {"namespace": NS, "signing_secret_file": str(work / "secret"),
                        "snapshot_interval_s": 1}}}, metrics=True)  # snapshots + trims too
    yield Fleet(port, secret, passwords, rp, admin)
    rp.stop()
    server.stop()


async def _publish(fleet: Fleet, worker: str, key: bytes | None, events: list[object],
                   user: str | None = None) -> None:
    pub = redis_publisher(fleet.url(user or worker), MODEL, worker, namespace=NS,
                          signer=Signer(key) if key else None, block_size=16,
                          heartbeat_ttl_s=10.0)
    await pub.start()
    pub.publish(events)  # type: ignore[arg-type]
    assert await pub.flush(10)
    await pub.stop(leave=False)


def _blocks(n: int, first: int = 1) -> BlockStored:
    return BlockStored(hashes=tuple(range(first, first + n)),
                       token_ids=tuple(range(first * 1000, first * 1000 + 16 * n)), block_size=16)


def test_signed_worker_is_indexed_and_forged_entries_are_dropped(fleet: Fleet) -> None:
    async def scenario() -> None:
        pub = redis_publisher(fleet.url("w0"), MODEL, "w0", namespace=NS,
                              signer=Signer(fleet.key("w0")), block_size=16, heartbeat_ttl_s=10.0)
        await pub.start()
        try:
            pub.publish([_blocks(3)])
            await asyncio.to_thread(wait_until, lambda: fleet.cached("w0") == 3, 20,
                                    what="w0's signed events applied")
            bad_before = fleet.metric('kvrouter_events_unauthenticated_total{kind="entry"')
            # Finding 2: a forged entry with a new epoch (AllCleared) for w0, written with
            # another worker's Redis user: unsigned, then signed with w1's own key.
            w1 = fleet.as_user("w1")
            stream = Keys(NS).stream(MODEL, 0)
            forged = entry_fields("w0", "forged-epoch", 0, encode_payload([AllCleared()]))
            w1.xadd(stream, forged)  # type: ignore[arg-type]
            forged[F_SIG] = Signer(fleet.key("w1")).sign(entry_signed_parts(MODEL, forged))
            w1.xadd(stream, forged)  # type: ignore[arg-type]
            await asyncio.to_thread(
                wait_until, lambda: fleet.metric('kvrouter_events_unauthenticated_total{kind="entry"')
                >= bad_before + 2, 20, what="forged entries counted")
            # Not blinded: its index entries stay and its next batches apply.
            pub.publish([_blocks(2, first=50)])
            await asyncio.to_thread(wait_until, lambda: fleet.cached("w0") == 5, 20,
                                    what="w0 still indexed")
        finally:
            await pub.stop(leave=False)

    asyncio.run(scenario())
    # A new epoch from the worker's own key (a restarted publisher) is accepted.
    asyncio.run(_publish(fleet, "w0", fleet.key("w0"), [_blocks(1, first=90)]))
    wait_until(lambda: fleet.cached("w0") == 1, 20, what="w0's new epoch applied")


def test_unsigned_heartbeat_makes_no_worker(fleet: Fleet, tmp_path: Path) -> None:
    """A heartbeat hash written without the worker's key (here by a Redis administrator,
    since ACLs keep workers off others' keys) never becomes a routable worker."""
    hb = Keys(NS).heartbeat(MODEL, "ghost")
    fleet.admin.hset(hb, mapping={H_META: encode_meta({"address": "10.6.6.6:1"}), b"n": b"1",
                                  HB_SIG[H_META]: b"0" * 16})
    fleet.admin.sadd(Keys(NS).workers(MODEL), "ghost")
    before = fleet.metric('kvrouter_events_unauthenticated_total{kind="heartbeat"')
    wait_until(lambda: fleet.metric('kvrouter_events_unauthenticated_total{kind="heartbeat"')
               > before, 20, what="ghost heartbeat rejected")
    assert "ghost" not in fleet.workers()


def test_acl_users_reach_only_their_role(fleet: Fleet) -> None:
    w0, router = fleet.as_user("w0"), fleet.as_user("kvrouter-router")
    keys = Keys(NS)
    stream = keys.stream(MODEL, 0)
    denied = redis.exceptions.NoPermissionError
    with pytest.raises(denied):
        w0.xrange(stream)  # workers append, never read
    with pytest.raises(denied):
        w0.xtrim(stream, maxlen=0)
    with pytest.raises(denied):
        w0.delete(stream)
    with pytest.raises(denied):
        w0.hset(keys.heartbeat(MODEL, "w1"), "n", "1")  # another worker's heartbeat
    with pytest.raises(denied):
        w0.lpop(keys.dump_requests(MODEL, "w1"))
    w0.hset(keys.heartbeat(MODEL, "w0"), "probe", "1")  # its own is fine
    assert router.xrange(stream, count=1) is not None  # the router reads
    with pytest.raises(denied):
        router.flushall()
    with pytest.raises(denied):
        router.config_get("*")
    with pytest.raises(denied):
        router.get("other-namespace:key")
    # The router did its whole job (read, liveness, snapshots, trims) with its ACL user.
    wait_until(lambda: fleet.metric("kvrouter_snapshots_written_total") > 0, 30,
               what="a snapshot written with the router's ACL user")
    assert "NOPERM" not in fleet.router.logs() and "failed" not in fleet.router.logs()


def test_keys_and_secrets_refuse_short_material(tmp_path: Path) -> None:
    with pytest.raises(SigningError):
        WorkerKeys(b"short")
    with pytest.raises(SigningError):
        Signer.from_env({"KVROUTER_EVENT_KEY": "abcd"})
    key = derive_worker_key(b"s" * 32, "m", "w")
    assert Signer.from_env({"KVROUTER_EVENT_KEY": key.hex()}).key == key  # type: ignore[union-attr]
    keys = WorkerKeys(b"s" * 32, require=False)
    assert keys.check("entry", "m", "w", [b"x"], None) is None  # rolling upgrade: accepted
    assert keys.check("entry", "m", "w", [b"x"], b"0" * 16) == "bad_signature"
