"""The endpoint picker over TLS (router.ext_proc_tls): the gateway connects with the router's
certificate and no client certificate, like the reference picker's secure serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrouter.testing.processes import RouterProcess, free_port, start_router
from tests.ext_proc_helpers import header_value, request_headers
from tests.security_helpers import Pki


@pytest.fixture(scope="module")
def tls_picker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Pki]]:
    pki = Pki.create(tmp_path_factory.mktemp("pki"))
    cert, key = pki.issue("router", server=True)
    port = free_port()
    rp: RouterProcess = start_router(
        tmp_path_factory.mktemp("router"),
        {"router": {"tls_cert": str(cert), "tls_key": str(key), "ext_proc_tls": True,
                    "heartbeat_timeout_s": 0}},
        args=("--ext-proc", f"127.0.0.1:{port}"), security=pki.client())
    # a worker to pick (registered over the router's TLS listener)
    from kvrouter.client import RouterClient

    with RouterClient(rp.target, security=pki.client()) as c:
        c.register_worker("default", "w1", address="10.0.0.1:8000", block_size=16)
    yield f"127.0.0.1:{port}", pki
    rp.stop()


def test_picker_serves_tls_to_a_gateway_without_client_certificate(
        tls_picker: tuple[str, Pki]) -> None:
    target, pki = tls_picker
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(target, creds) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = pb_grpc.ExternalProcessorStub(ch).Process(
            iter([request_headers(path="/v1/models", end_of_stream=True)]), timeout=10)
        first = next(iter(replies))
        assert header_value(first.request_headers.response,
                            "x-gateway-destination-endpoint") == "10.0.0.1:8000"


def test_picker_over_tls_refuses_plaintext(tls_picker: tuple[str, Pki]) -> None:
    target, _ = tls_picker
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_ext_proc_tls_without_a_certificate_is_refused(
        kvrouter_cli: Callable[..., Any], tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("router: {ext_proc_tls: true}\n")
    out = kvrouter_cli("serve", "--config", str(cfg), "--listen", "127.0.0.1:0",
                       "--metrics-port", "0", "--ext-proc", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "ext_proc_tls needs tls_cert" in out.stderr
