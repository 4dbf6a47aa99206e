"""TLS and mutual TLS on the router's gRPC and /metrics listeners, the Router clients, and a
simulated engine (its Engine listener and its link to the router), with certificates made
at test time (tests/security_helpers.py)."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvrouter.client import RouterClient
from kvrouter.security.channels import ClientSecurity
from kvrouter.security.tls import TlsError, TlsFiles, is_loopback
from kvrouter.testing.processes import RouterProcess, start_router, start_sim_engine
from kvrouter.testing.wait import wait_until
from tests.security_helpers import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert is_loopback("unix:/tmp/x.sock")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("[::]:1")
    assert not is_loopback("10.0.0.1:1") and not is_loopback("router.example:1")


def test_inconsistent_tls_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="go together"):
        TlsFiles(cert=tmp_path / "c.pem")
    with pytest.raises(TlsError, match="mutual TLS"):
        TlsFiles(cert=tmp_path / "c.pem", key=tmp_path / "k.pem", client_auth=True)
    with pytest.raises(TlsError, match="cannot read TLS key"):
        TlsFiles(cert=tmp_path / "c.pem", key=tmp_path / "k.pem").server_credentials()
    assert TlsFiles.from_env({}) is None
    env = {"KVROUTER_TLS_CA": "/ca.pem", "KVROUTER_TLS_CLIENT_AUTH": "no"}
    assert TlsFiles.from_env(env) == TlsFiles(ca=Path("/ca.pem"))


@pytest.fixture(scope="module")
def tls_router(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    """A router serving gRPC and /metrics over TLS (server certificate only)."""
    cert, key = pki.issue("router", server=True)
    rp = start_router(tmp_path_factory.mktemp("tls-router"),
                      {"router": {"tls_cert": str(cert), "tls_key": str(key)}}, metrics=True,
                      security=pki.client())
    yield rp
    rp.stop()


def test_tls_router_answers_clients_that_trust_its_ca(tls_router: RouterProcess,
                                                      pki: Pki) -> None:
    with RouterClient(tls_router.target, security=pki.client()) as c:
        assert [m.name for m in c.list_models()] == ["default"]


def test_tls_router_refuses_plaintext_and_untrusted_clients(tls_router: RouterProcess,
                                                            tmp_path: Path) -> None:
    with RouterClient(tls_router.target, timeout=3, security=ClientSecurity()) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.list_models()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    other = Pki.create(tmp_path / "other")  # a CA the router's certificate is not from
    with RouterClient(tls_router.target, timeout=3, security=other.client()) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.list_models()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_metrics_over_tls(tls_router: RouterProcess, pki: Pki) -> None:
    url = f"https://127.0.0.1:{tls_router.metrics_port}/metrics"
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        assert b"# HELP kvrouter_auth_denied_total" in resp.read()
    with pytest.raises(OSError):  # plain HTTP against the TLS listener
        urllib.request.urlopen(f"http://127.0.0.1:{tls_router.metrics_port}/metrics", timeout=5)


def test_ssl_contexts_for_http_fronts(pki: Pki) -> None:
    cert, key = pki.issue("front", server=True)
    files = TlsFiles(cert=cert, key=key, ca=pki.ca, client_auth=True)
    assert files.server_ssl_context().verify_mode is ssl.CERT_REQUIRED
    assert files.server_ssl_context(client_auth=False).verify_mode is ssl.CERT_OPTIONAL
    assert TlsFiles(cert=cert, key=key).server_ssl_context().verify_mode is ssl.CERT_NONE
    assert files.client_ssl_context().verify_mode is ssl.CERT_REQUIRED


def test_mutual_tls_router_and_engine(pki: Pki, tmp_path: Path) -> None:
    """mTLS everywhere: the router requires client certificates; a simulated engine serves
    its Engine service over mTLS and reaches the router with its own certificate; the
    router's Generate proxy calls the engine with the router's certificate."""
    r_cert, r_key = pki.issue("router-m", server=True, client=True)
    e_cert, e_key = pki.issue("engine-e0", server=True, client=True)
    c_cert, c_key = pki.issue("client-c", client=True)
    router_env = pki.server_env(r_cert, r_key, client_auth=True)  # also its engine channels
    rp = start_router(tmp_path / "r", {"router": {"tls_cert": str(r_cert), "tls_key": str(r_key),
                                                  "tls_ca": str(pki.ca),
                                                  "tls_client_auth": True}},
                      env=router_env, security=pki.client(c_cert, c_key))
    engine = None
    try:
        with RouterClient(rp.target, timeout=3, security=pki.client()) as c, \
                pytest.raises(grpc.RpcError) as err:
            c.list_models()  # no client certificate
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        engine = start_sim_engine(tmp_path, "e0", router=rp.target,
                                  env=pki.server_env(e_cert, e_key, client_auth=True))
        with RouterClient(rp.target, security=pki.client(c_cert, c_key)) as c:
            workers = wait_until(lambda: c.list_workers(), 30, what="engine registered")
            assert [w.name for w in workers] == ["e0"]
            out = list(c.stub.Generate(_generate_request(), timeout=30))
            assert sum(len(r.token_ids) for r in out) == 4
        # The engine's Engine listener refuses a caller without a client certificate.
        from kvrouter._proto.v1 import engine_pb2, engine_pb2_grpc
        with pki.client().channel(engine.address) as ch, pytest.raises(grpc.RpcError) as err:
            engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(), timeout=3)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        if engine is not None:
            engine.stop()
        rp.stop()


def _generate_request() -> object:
    from kvrouter._proto.v1 import common_pb2, router_pb2

    return router_pb2.RouterGenerateRequest(token_ids=list(range(40)),
                                            sampling=common_pb2.SamplingParams(max_tokens=4))
