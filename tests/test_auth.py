"""Authentication and roles on the router (kvrouter.security.auth), against real `kvrouter
serve` processes on loopback: tokens per principal, the worker identity binding (the
registration hijack of issue 13 finding 1), the admin port, the secure-default listen rule
and --insecure."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvrouter.client import RouterClient
from kvrouter.events.codec import encode_payload
from kvrouter.events.model import BlockStored
from kvrouter.security.auth import Authenticator, AuthError, token_digest
from kvrouter.security.channels import ClientSecurity
from kvrouter.testing.processes import (
    RouterProcess,
    child_env,
    free_port,
    kvrouter_cmd,
    start_router,
    start_sim_engine,
    wait_grpc_serving,
)
from kvrouter.testing.wait import wait_until
from tests.security_helpers import new_token, write_auth_file

TOKENS = {name: new_token() for name in ("client", "w0", "w1", "admin", "ops")}


def as_(name: str | None) -> ClientSecurity:
    """Credentials of principal `name` (None: no token)."""
    return ClientSecurity(token=TOKENS[name] if name else None)


def _principals() -> list[dict[str, object]]:
    return [
        {"name": "client", "roles": ["client"], "token": TOKENS["client"]},
        {"name": "w0", "roles": ["worker"], "token_env": "TEST_W0_TOKEN"},
        {"name": "w1", "roles": ["worker"], "token_sha256": token_digest(TOKENS["w1"]).hex()},
        {"name": "admin", "roles": ["admin"], "token": TOKENS["admin"]},
        {"name": "ops", "roles": ["client", "admin"], "token": TOKENS["ops"]},
    ]


@pytest.fixture(scope="module")
def auth_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    work = tmp_path_factory.mktemp("auth")
    auth = write_auth_file(work / "auth.yaml", _principals())
    rp = start_router(work, {"router": {"auth_file": str(auth)}}, metrics=True,
                      env={"TEST_W0_TOKEN": TOKENS["w0"]})
    yield rp
    rp.stop()


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()


def _metric(rp: RouterProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{rp.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def test_callers_without_a_known_token_are_refused(auth_router: RouterProcess) -> None:
    before = _metric(auth_router, 'kvrouter_auth_denied_total{reason="unauthenticated"}')
    with RouterClient(auth_router.target, security=as_(None)) as c:
        assert _code(c.list_models) is grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: c.register_worker("default", "w0")) is grpc.StatusCode.UNAUTHENTICATED
    with RouterClient(auth_router.target, security=ClientSecurity(token=new_token())) as c:
        assert _code(lambda: c.route([1, 2, 3])) is grpc.StatusCode.UNAUTHENTICATED
    after = _metric(auth_router, 'kvrouter_auth_denied_total{reason="unauthenticated"}')
    assert after == before + 3


def test_each_role_reaches_only_its_rpcs(auth_router: RouterProcess) -> None:
    t = auth_router.target
    with RouterClient(t, security=as_("client")) as c:
        assert [m.name for m in c.list_models()] == ["default"]
        assert _code(lambda: c.register_worker("default", "client")) is grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: c.drain_worker("default", "w0")) is grpc.StatusCode.PERMISSION_DENIED
    with RouterClient(t, security=as_("w0")) as w:
        w.register_worker("default", "w0", address="127.0.0.1:1")
        assert w.heartbeat("default", "w0") == "up"
        assert _code(lambda: w.route([1, 2, 3])) is grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: w.drain_worker("default", "w0")) is grpc.StatusCode.PERMISSION_DENIED
    with RouterClient(t, security=as_("admin")) as a:
        assert _code(a.list_models) is grpc.StatusCode.PERMISSION_DENIED
        a.drain_worker("default", "w0")
    with RouterClient(t, security=as_("ops")) as o:
        assert {w.name: w.status for w in o.list_workers()}["w0"] == "draining"
        o.deregister_worker("default", "w0")
        assert [w.name for w in o.list_workers()] == []


def test_a_worker_credential_speaks_only_for_its_own_worker(auth_router: RouterProcess) -> None:
    """Finding 1: registering another worker's name with one's own address, publishing
    events or load for it, or deregistering it, is refused and changes nothing."""
    t = auth_router.target
    with RouterClient(t, security=as_("w1")) as w1, RouterClient(t, security=as_("w0")) as w0, \
            RouterClient(t, security=as_("ops")) as ops:
        w1.register_worker("default", "w1", address="127.0.0.1:7001")
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: w0.register_worker("default", "w1", address="10.6.6.6:1")) is denied
        payload = encode_payload([BlockStored(hashes=(1, 2, 3), token_ids=tuple(range(48)),
                                               block_size=16)])
        assert _code(lambda: w0.publish_events("default", "w1", "forged", 1, payload)) is denied
        assert _code(lambda: w0.heartbeat("default", "w1", epoch="forged")) is denied
        assert _code(lambda: w0.deregister_worker("default", "w1")) is denied
        (state,) = [w for w in ops.list_workers() if w.name == "w1"]
        assert state.address == "127.0.0.1:7001" and state.cached_blocks == 0
        w1.publish_events("default", "w1", "e1", 1, payload)  # its own credential: accepted
        wait_until(lambda: next(w for w in ops.list_workers() if w.name == "w1").cached_blocks == 3,
                   10, what="w1's own events applied")
        w1.deregister_worker("default", "w1")  # a worker may deregister itself
        assert [w.name for w in ops.list_workers()] == []


def test_sim_engine_registers_with_its_token(auth_router: RouterProcess, tmp_path: Path) -> None:
    """An engine passes its credential through the environment (KVROUTER_TOKEN)."""
    eng = start_sim_engine(tmp_path, "w0", router=auth_router.target,
                           env={"KVROUTER_TOKEN": TOKENS["w0"]})
    try:
        with RouterClient(auth_router.target, security=as_("client")) as c:
            wait_until(lambda: [w.name for w in c.list_workers()] == ["w0"], 30,
                       what="w0 registered")
    finally:
        eng.stop()
    with RouterClient(auth_router.target, security=as_("client")) as c:
        # It deregistered itself on a clean shutdown (a worker's own DeregisterWorker).
        wait_until(lambda: c.list_workers() == [], 10, what="w0 deregistered")


def test_admin_port_serves_admin_rpcs_only(tmp_path: Path) -> None:
    auth = write_auth_file(tmp_path / "auth.yaml", _principals())
    admin_port = free_port()
    rp = start_router(tmp_path, {"router": {"auth_file": str(auth),
                                            "admin_listen": f"127.0.0.1:{admin_port}"}},
                      env={"TEST_W0_TOKEN": TOKENS["w0"]})
    try:
        with RouterClient(rp.target, security=as_("w0")) as w:
            w.register_worker("default", "w0")
        denied = grpc.StatusCode.PERMISSION_DENIED
        with RouterClient(rp.target, security=as_("ops")) as main:
            assert _code(lambda: main.drain_worker("default", "w0")) is denied
            assert main.list_workers()[0].status == "up"
        with RouterClient(f"127.0.0.1:{admin_port}", security=as_("ops")) as admin:
            assert _code(admin.list_models) is denied
            admin.drain_worker("default", "w0")
        with RouterClient(rp.target, security=as_("ops")) as main:
            assert main.list_workers()[0].status == "draining"
    finally:
        rp.stop()


def test_reachable_listener_needs_tls_and_auth_or_insecure(tmp_path: Path) -> None:
    port = free_port()
    refused = subprocess.run(kvrouter_cmd("serve", "--listen", f"0.0.0.0:{port}",
                                          "--metrics-port", "0"),
                             env=child_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "reachable from other machines" in refused.stderr and "--insecure" in refused.stderr
    mport = free_port()
    rp = RouterProcess("exposed", kvrouter_cmd("serve", "--listen", f"0.0.0.0:{port}",
                                               "--metrics-port", str(mport), "--insecure"),
                       tmp_path / "exposed.log", port=port, metrics_port=mport).start()
    try:
        wait_grpc_serving(rp.target, 30, [rp])
        assert "INSECURE" in rp.logs()
        assert _metric(rp, 'kvrouter_insecure_listener{listener="grpc"}') == 1
    finally:
        rp.stop()


def test_auth_file_errors_are_clear(tmp_path: Path) -> None:
    def load(principals: list[dict[str, object]], env: dict[str, str] | None = None) -> None:
        Authenticator.from_file(write_auth_file(tmp_path / "a.yaml", principals), env or {})

    with pytest.raises(AuthError, match="no credential"):
        load([{"name": "x", "roles": ["client"]}])
    with pytest.raises(AuthError, match="share a token"):
        load([{"name": "x", "roles": ["client"], "token": "t" * 20},
              {"name": "y", "roles": ["admin"], "token": "t" * 20}])
    with pytest.raises(AuthError, match="MISSING_VAR"):
        load([{"name": "x", "roles": ["client"], "token_env": "MISSING_VAR"}])
    with pytest.raises(AuthError, match="roles"):
        load([{"name": "x", "roles": ["superuser"], "token": "t" * 20}])
    with pytest.raises(AuthError, match="cannot read"):
        Authenticator.from_file(tmp_path / "absent.yaml")
    bad = subprocess.run(kvrouter_cmd("serve", "--listen", f"127.0.0.1:{free_port()}",
                                      "--metrics-port", "0", "--auth-file",
                                      str(tmp_path / "absent.yaml")),
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "absent.yaml" in bad.stderr


def test_engine_service_takes_the_same_principals(tmp_path: Path) -> None:
    """An engine with KVROUTER_AUTH_FILE serves only authenticated callers; the router's
    Generate reaches it with the router process's own token (KVROUTER_TOKEN)."""
    from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2

    router_token = new_token()
    auth = write_auth_file(tmp_path / "auth.yaml", [
        *_principals(), {"name": "router", "roles": ["client"], "token": router_token}])
    rp = start_router(tmp_path, {"router": {"auth_file": str(auth)}},
                      env={"TEST_W0_TOKEN": TOKENS["w0"], "KVROUTER_TOKEN": router_token})
    eng = None
    try:
        eng = start_sim_engine(tmp_path, "w0", router=rp.target, env={
            "KVROUTER_TOKEN": TOKENS["w0"], "KVROUTER_AUTH_FILE": str(auth),
            "TEST_W0_TOKEN": TOKENS["w0"]})
        with RouterClient(rp.target, security=as_("client")) as c:
            wait_until(lambda: [w.name for w in c.list_workers()] == ["w0"], 30,
                       what="w0 registered")
            out = list(c.stub.Generate(router_pb2.RouterGenerateRequest(
                token_ids=list(range(40)), sampling=common_pb2.SamplingParams(max_tokens=3)),
                timeout=30))
            assert sum(len(r.token_ids) for r in out) == 3
        with as_(None).channel(eng.address) as ch:
            stats = engine_pb2_grpc.EngineStub(ch).Stats
            assert _code(lambda: stats(engine_pb2.StatsRequest(), timeout=5)) \
                is grpc.StatusCode.UNAUTHENTICATED
        with as_("client").channel(eng.address) as ch:
            assert engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(), timeout=5).worker == "w0"
    finally:
        if eng is not None:
            eng.stop()
        rp.stop()


def test_async_client_and_route_stream_carry_the_token(auth_router: RouterProcess) -> None:
    import asyncio

    from kvrouter.client import AsyncRouterClient

    async def run() -> None:
        async with AsyncRouterClient(auth_router.target, security=as_("client")) as c:
            assert [m.name for m in await c.list_models()] == ["default"]
            async with c.stream() as s:
                out = await s.route_many([])  # an empty message still needs the role
                assert out == []
        async with AsyncRouterClient(auth_router.target, security=as_("w0")) as w:
            with pytest.raises(grpc.RpcError) as err:
                async with w.stream() as s:
                    await s.route_many([])
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(run())


def test_a_refused_route_stream_reports_the_refusal_even_when_writing_after_it(
        auth_router: RouterProcess) -> None:
    """The router ends a RouteStream it refuses at once; a message written after that
    fails in grpc.aio with INTERNAL, and the session reports the call's own status."""
    import asyncio

    from kvrouter.client import AsyncRouterClient

    async def run() -> None:
        async with AsyncRouterClient(auth_router.target, security=as_("w0")) as w:
            with pytest.raises(grpc.RpcError) as err:
                async with w.stream() as s:
                    reader = s._reader
                    assert reader is not None
                    await asyncio.wait([reader], timeout=10)  # the refusal has arrived
                    assert reader.done()
                    await s.route_many([])
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(run())


def test_a_token_is_never_sent_in_plaintext_off_the_machine() -> None:
    from kvrouter.security.tls import TlsError

    with pytest.raises(TlsError, match="only over TLS or to a loopback"):
        ClientSecurity(token=new_token()).channel("10.1.2.3:50051")
    with pytest.raises(TlsError, match="only over TLS or to a loopback"):
        ClientSecurity(token=new_token()).aio_channel("router.example:50051")
    ClientSecurity(token=new_token()).channel("127.0.0.1:1").close()


def test_every_reachable_listener_falls_under_the_rule(tmp_path: Path) -> None:
    from kvrouter.config import ConfigError, load_config

    for router in ({"http": "0.0.0.0:8000"}, {"admin_listen": "[::]:50052"}):
        with pytest.raises(ConfigError, match="reachable from other machines"):
            load_config(env={}, overrides={"router": router})
    auth = write_auth_file(tmp_path / "auth.yaml", _principals())
    # TLS and auth make them fine; so does --insecure.
    load_config(env={}, overrides={"router": {
        "http": "0.0.0.0:8000", "admin_listen": "[::]:50052", "auth_file": str(auth),
        "tls_cert": str(tmp_path / "c.pem"), "tls_key": str(tmp_path / "k.pem")}})
    load_config(env={}, overrides={"router": {"http": "0.0.0.0:8000", "insecure": True}})
