"""The planner's router link under the router's security: gRPC over TLS with a bearer token
and /metrics over TLS, from the same KVROUTER_TLS_* / KVROUTER_TOKEN* settings as every
kvrouter client (a real `kvrouter serve` with a certificate and an auth file)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from kvrouter.autoscale.command import default_metrics_url
from kvrouter.autoscale.loop import RouterTelemetry
from kvrouter.client import AsyncRouterClient
from kvrouter.security.channels import ClientSecurity
from kvrouter.testing.processes import RouterProcess, start_router
from tests.security_helpers import Pki, new_token, write_auth_file

ADMIN, CLIENT = new_token(), new_token()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_router(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    work = tmp_path_factory.mktemp("secure-router")
    cert, key = pki.issue("router", server=True)
    auth = write_auth_file(work / "auth.yaml", [
        {"name": "planner", "roles": ["admin", "client"], "token": ADMIN},
        {"name": "app", "roles": ["client"], "token": CLIENT}])
    rp = start_router(work, {"router": {"tls_cert": str(cert), "tls_key": str(key),
                                        "auth_file": str(auth)}},
                      metrics=True, security=pki.client(token=ADMIN))
    yield rp
    rp.stop()


def test_metrics_url_follows_the_tls_settings(pki: Pki) -> None:
    assert default_metrics_url(ClientSecurity()) == "http://127.0.0.1:9400/metrics"
    assert default_metrics_url(pki.client(), 9401) == "https://127.0.0.1:9401/metrics"
    env = {"KVROUTER_TLS_CA": str(pki.ca), "KVROUTER_TOKEN": ADMIN}
    assert ClientSecurity.from_env(env) == pki.client(token=ADMIN)


def test_telemetry_and_admin_calls_over_tls_with_a_token(secure_router: RouterProcess,
                                                         pki: Pki) -> None:
    security = pki.client(token=ADMIN)
    url = default_metrics_url(security, secure_router.metrics_port)

    async def go() -> None:
        async with AsyncRouterClient(secure_router.target, security=security) as client:
            tel = RouterTelemetry(client, url, "default", "disaggregated", security=security)
            assert await tel.read(1.0) is None  # the first read only sets the baseline
            sample = await tel.read(2.0)
            assert sample is not None and sample.arrivals == 0 and tel.workers == {}
            # The token carries the admin role: DrainWorker reaches the registry.
            with pytest.raises(grpc.RpcError) as err:
                await client.drain_worker("default", "no-such-worker")
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
    asyncio.run(go())


def test_telemetry_without_the_routers_trust_fails_clearly(secure_router: RouterProcess,
                                                           pki: Pki, tmp_path: Path) -> None:
    url = default_metrics_url(pki.client(), secure_router.metrics_port)

    async def go() -> None:
        async with AsyncRouterClient(secure_router.target, security=pki.client(token=ADMIN)
                                     ) as client:
            other = Pki.create(tmp_path / "other")  # a CA that did not sign the router
            tel = RouterTelemetry(client, url, "default", "disaggregated",
                                  security=other.client())
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await tel.read(1.0)
        # A client-only token cannot drain: the planner needs the admin role.
        async with AsyncRouterClient(secure_router.target, security=pki.client(token=CLIENT)
                                     ) as client:
            with pytest.raises(grpc.RpcError) as err:
                await client.drain_worker("default", "no-such-worker")
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    asyncio.run(go())
