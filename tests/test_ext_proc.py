"""The Gateway API endpoint picker (kvrouter.server.ext_proc) driven like Envoy drives it.

No Envoy binary installs here, so a gRPC client plays Envoy: it sends the exact message
sequence Envoy's ext_proc filter sends for one HTTP request, waiting where Envoy waits.

Sources the sequences and expectations come from:
* Endpoint Picker Protocol, gateway-api-inference-extension
  docs/proposals/004-endpoint-picker-protocol/README.md: the `x-gateway-destination-endpoint`
  header and the same value under dynamic metadata `envoy.lb`; the subset hint in filter
  metadata `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset` (pick only from it,
  503 ImmediateResponse when none is eligible or it is empty); the served endpoint in the
  response's metadata_context `envoy.lb` / `x-gateway-destination-endpoint-served`; gRPC
  health for liveness, readiness and envoy.service.ext_proc.v3.ExternalProcessor.
* Envoy API, envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto, BodySendMode
  FULL_DUPLEX_STREAMED: the client streams body chunks as they arrive (end_of_stream on the
  last, or trailers after it); the server may buffer everything, then must answer in
  headers-body-trailers order with StreamedBodyResponse chunks (<= 64 KiB recommended).
  BUFFERED: the whole body in one message, sent after the headers response.
* Envoy API, envoy/service/ext_proc/v3/external_processor.proto: ProcessingRequest (one phase
  per message, metadata_context, protocol_config in the first message), ProcessingResponse
  (HeadersResponse / BodyResponse / TrailersResponse / ImmediateResponse, dynamic_metadata).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvrouter.client import RouterClient
from kvrouter.testing.processes import free_port
from kvrouter.testing.wait import wait_until
from tests.ext_proc_helpers import (
    BS,
    ENDPOINTS,
    PM,
    Envoy,
    body_chunks,
    completion,
    header_value,
    idle,
    lb_metadata,
    request_headers,
    reserved,
    response_headers,
    tokens,
)

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def blocks(block_store_class: type) -> Any:
    """One publisher of KV events for the module's router (sequence numbers per worker)."""
    return block_store_class()


@pytest.fixture(scope="module")
def picker_router(module_router_server: Callable[..., Any]) -> Any:
    # bodies over max_message_bytes are refused (413): small here, to test it cheaply
    cfg = {"router": {"heartbeat_timeout_s": 0, "max_message_bytes": MAX_BODY},
           "models": [{"name": "default", "block_size": BS, "vocab_size": 32000}]}
    return module_router_server(cfg, args=("--ext-proc", f"127.0.0.1:{free_port()}"),
                                metrics=True)


@pytest.fixture(scope="module")
def picker(picker_router: Any) -> Iterator[tuple[RouterClient, str]]:
    client = RouterClient(picker_router.target)
    for name, ep in ENDPOINTS.items():
        client.register_worker("default", name, address=ep, block_size=BS)
    args = list(picker_router.cmd)
    yield client, args[args.index("--ext-proc") + 1]
    client.close()


# ------------------------------------------------------------------ the two body modes


def test_full_duplex_streamed_answers_after_the_whole_body_then_echoes_it(
        picker: tuple[RouterClient, str], blocks: Any) -> None:
    client, target = picker
    prompt = tokens(1, 20_000)  # ~120 KB of JSON: several chunks each way
    blocks(client, "default", "w2", prompt[:4096], BS)  # only the body can tell
    body = completion(prompt)
    env = Envoy(target)
    try:
        env.send(request_headers(extra={"x-session-id": "fd-1"}))
        for chunk in body_chunks(body, 16 * 1024):
            env.send(chunk)
        first = env.recv()
        assert first.WhichOneof("response") == "request_headers"
        common = first.request_headers.response
        dest = header_value(common, "x-gateway-destination-endpoint")
        assert dest is not None and dest.split(",")[0] == ENDPOINTS["w2"]
        assert set(dest.split(",")) <= set(ENDPOINTS.values())
        assert lb_metadata(first) == dest  # header and metadata carry the same value
        assert common.clear_route_cache
        echoed = b""
        while True:
            r = env.recv()
            assert r.WhichOneof("response") == "request_body"
            sb = r.request_body.response.body_mutation.streamed_response
            assert len(sb.body) <= 64 * 1024
            echoed += sb.body
            if sb.end_of_stream:
                break
        assert echoed == body
        assert reserved(client)["w2"] == (1, 20_000 - 4096)  # its uncached prompt, until done
        # the upstream answers: prefill done; the streamed response passes through unchanged
        env.send(response_headers(served=ENDPOINTS["w2"]))
        assert env.recv().WhichOneof("response") == "response_headers"
        assert reserved(client)["w2"] == (1, 0)
        for i, data in enumerate([b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"]):
            env.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=data,
                                                                    end_of_stream=i == 1)))
            sb = env.recv().response_body.response.body_mutation.streamed_response
            assert (sb.body, sb.end_of_stream) == (data, i == 1)
        assert env.rest() == []
    finally:
        env.close()
    assert idle(client)


def test_buffered_answers_headers_first_and_routes_in_the_body_response(
        picker: tuple[RouterClient, str], blocks: Any) -> None:
    client, target = picker
    prompt = tokens(2, 512)
    blocks(client, "default", "w3", prompt, BS)
    env = Envoy(target)
    try:
        env.send(request_headers(mode=PM.BUFFERED))
        # Envoy waits for this before it sends the buffered body
        h = env.recv()
        assert h.WhichOneof("response") == "request_headers"
        assert not h.request_headers.response.header_mutation.set_headers
        env.send(body_chunks(completion(prompt), 1 << 20)[0])
        b = env.recv()
        assert b.WhichOneof("response") == "request_body"
        dest = header_value(b.request_body.response, "x-gateway-destination-endpoint")
        assert dest is not None and dest.split(",")[0] == ENDPOINTS["w3"]
        assert lb_metadata(b) == dest
        assert not b.request_body.response.HasField("body_mutation")  # body unchanged
        env.send(response_headers())
        assert env.recv().WhichOneof("response") == "response_headers"
        env.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True)))
        r = env.recv()
        assert r.WhichOneof("response") == "response_body"
        assert not r.response_body.response.HasField("body_mutation")
        assert env.rest() == []
    finally:
        env.close()
    assert idle(client)


def test_trailers_end_the_body_and_are_answered_last(picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    body = completion(tokens(3, 64))
    env = Envoy(target)
    try:
        env.send(request_headers())
        for chunk in body_chunks(body, 100, last_eos=False):
            env.send(chunk)
        env.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
        kinds, echoed, eos = [], b"", []
        while True:
            r = env.recv()
            kinds.append(r.WhichOneof("response"))
            if kinds[-1] == "request_body":
                sb = r.request_body.response.body_mutation.streamed_response
                echoed += sb.body
                eos.append(sb.end_of_stream)
            if kinds[-1] == "request_trailers":
                break
        assert kinds[0] == "request_headers" and kinds[-1] == "request_trailers"
        assert set(kinds[1:-1]) == {"request_body"}
        assert echoed == body and not any(eos)  # the trailers, not the body, end the request
    finally:
        env.close()
    wait_until(lambda: idle(client), 10, what="reservation released after an early end")


def test_request_without_body_gets_an_endpoint_at_once(picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    env = Envoy(target)
    try:
        env.send(request_headers(path="/v1/models", end_of_stream=True))
        r = env.recv()
        dest = header_value(r.request_headers.response, "x-gateway-destination-endpoint")
        assert dest in ENDPOINTS.values() and lb_metadata(r) == dest
    finally:
        env.close()
    assert idle(client)


# ------------------------------------------------------------------ subset, affinity, health


def test_subset_hint_restricts_the_choice(picker: tuple[RouterClient, str],
                                          blocks: Any) -> None:
    client, target = picker
    prompt = tokens(4, 256)
    blocks(client, "default", "w1", prompt, BS)
    env = Envoy(target)
    try:
        env.send(request_headers(subset=[ENDPOINTS["w3"]]))
        env.send(body_chunks(completion(prompt), 1 << 20)[0])
        r = env.recv()
        dest = header_value(r.request_headers.response, "x-gateway-destination-endpoint")
        assert dest == ENDPOINTS["w3"]  # the cached w1 is outside the subset; no fallbacks
    finally:
        env.close()
    wait_until(lambda: idle(client), 10, what="reservation released")


@pytest.mark.parametrize("subset", [[], ["192.0.2.9:8000"]])
def test_empty_or_foreign_subset_is_503(picker: tuple[RouterClient, str],
                                        subset: list[str]) -> None:
    client, target = picker
    env = Envoy(target)
    try:
        env.send(request_headers(subset=subset))
        env.send(body_chunks(completion(tokens(5, 32)), 1 << 20)[0])
        r = env.recv()
        assert r.immediate_response.status.code == 503
        assert "subset" in json.loads(r.immediate_response.body)["error"]["message"]
        assert env.rest() == []
    finally:
        env.close()
    assert idle(client)


def test_session_header_keeps_the_session_on_its_worker(
        picker: tuple[RouterClient, str], blocks: Any) -> None:
    client, target = picker
    first, second = tokens(6, 256), tokens(7, 256)
    blocks(client, "default", "w1", first, BS)
    blocks(client, "default", "w2", second, BS)

    def route(prompt: list[int]) -> str:
        env = Envoy(target)
        try:
            env.send(request_headers(extra={"x-session-id": "conv-epp"}))
            env.send(body_chunks(completion(prompt), 1 << 20)[0])
            dest = header_value(env.recv().request_headers.response,
                                "x-gateway-destination-endpoint")
            assert dest is not None
            return dest.split(",")[0]
        finally:
            env.close()

    assert route(first) == ENDPOINTS["w1"]
    # the second turn's prompt is cached on w2, but the session stays on w1
    assert route(second) == ENDPOINTS["w1"]
    wait_until(lambda: idle(client), 10, what="reservations released")


def test_grpc_health_serves_the_protocols_services(picker: tuple[RouterClient, str]) -> None:
    _, target = picker
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


# ------------------------------------------------------------------ bad input


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "nope", "prompt": [1, 2]}).encode(), 404, "does not exist"),
    (json.dumps({"model": 7, "prompt": [1, 2]}).encode(), 400, "model"),
    (json.dumps({"model": "default", "prompt": "text"}).encode(), 400, "tokenizer"),
    (json.dumps({"model": "default", "prompt": []}).encode(), 400, "empty"),
    (json.dumps({"model": "default", "prompt": [-1, 5]}).encode(), 400, "token ids"),
    (json.dumps({"model": "default", "prompt": [40000]}).encode(), 400, "vocab"),
    (json.dumps({"model": "default", "prompt": [1], "user": "a b"}).encode(), 400, "session_id"),
    (json.dumps({"model": "default", "prompt": [1], "user": 5}).encode(), 400, "user"),
    (json.dumps({"model": "default"}).encode(), 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "says"), BAD_BODIES)
def test_bad_input_is_a_4xx_immediate_response_and_reserves_nothing(
        picker: tuple[RouterClient, str], body: bytes, status: int, says: str) -> None:
    client, target = picker
    env = Envoy(target)
    try:
        env.send(request_headers())
        for chunk in body_chunks(body, 4):
            env.send(chunk)
        r = env.recv()
        assert r.WhichOneof("response") == "immediate_response"
        assert r.immediate_response.status.code == status
        err = json.loads(r.immediate_response.body)["error"]
        assert says in err["message"]
        assert env.rest() == []  # the stream ends cleanly: no gRPC error
        assert env.call.code() == grpc.StatusCode.OK
    finally:
        env.close()
    assert idle(client)


def test_stream_that_ends_early_releases_the_reservation(
        picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    env = Envoy(target)
    env.send(request_headers())
    env.send(body_chunks(completion(tokens(8, 64)), 1 << 20)[0])
    assert env.recv().WhichOneof("response") == "request_headers"
    assert sum(n for n, _ in reserved(client).values()) == 1
    env.close()  # the gateway goes away before the upstream ever answers
    wait_until(lambda: idle(client), 10, what="reservation released after the stream ended")
    # a body cut off before end_of_stream reserves nothing at all
    env = Envoy(target)
    env.send(request_headers())
    env.send(body_chunks(completion(tokens(9, 64)), 10, last_eos=False)[0])
    env.close()
    assert idle(client)
    # and the picker still serves
    env = Envoy(target)
    try:
        env.send(request_headers(path="/v1/models", end_of_stream=True))
        assert env.recv().WhichOneof("response") == "request_headers"
    finally:
        env.close()


def metric(router: Any, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/metrics",
                                  timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_outcomes_are_counted_in_prometheus(picker: tuple[RouterClient, str],
                                            picker_router: Any) -> None:
    _, target = picker
    name = "kvrouter_ext_proc_requests_total"
    picked, bad = metric(picker_router, name, outcome="picked"), metric(picker_router, name,
                                                                        outcome="400")
    for body in (completion(tokens(20, 32)), b"{oops"):
        env = Envoy(target)
        try:
            env.send(request_headers())
            env.send(body_chunks(body, 1 << 20)[0])
            env.recv()
        finally:
            env.close()
    assert metric(picker_router, name, outcome="picked") == picked + 1
    assert metric(picker_router, name, outcome="400") == bad + 1


def test_a_gateway_fallback_moves_the_session_to_the_endpoint_that_served(
        picker: tuple[RouterClient, str], blocks: Any) -> None:
    client, target = picker
    prompt = tokens(21, 256)
    blocks(client, "default", "w1", prompt, BS)

    def turn(served: str | None) -> str:
        env = Envoy(target)
        try:
            env.send(request_headers(extra={"x-session-id": "conv-fallback"}))
            env.send(body_chunks(completion(prompt), 1 << 20)[0])
            dest = header_value(env.recv().request_headers.response,
                                "x-gateway-destination-endpoint")
            assert dest is not None
            env.send(response_headers(served=served))
            env.recv()
            env.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}",
                                                                    end_of_stream=True)))
            env.recv()
            return dest.split(",")[0]
        finally:
            env.close()

    assert turn(served=ENDPOINTS["w3"]) == ENDPOINTS["w1"]  # w1 failed; the gateway used w3
    assert turn(served=None) == ENDPOINTS["w3"]  # the session is on w3 now
    wait_until(lambda: idle(client), 10, what="reservations released")


def test_without_protocol_config_the_configured_mode_applies(
        picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    body = completion(tokens(23, 64))
    env = Envoy(target)
    try:
        env.send(request_headers(mode=None))  # an Envoy that does not say: full duplex (default)
        for chunk in body_chunks(body, 50):
            env.send(chunk)
        kinds = [env.recv().WhichOneof("response")]
        while kinds[-1] != "request_body" or len(kinds) < 2:
            kinds.append(env.recv().WhichOneof("response"))
        assert kinds == ["request_headers", "request_body"]
    finally:
        env.close()
    wait_until(lambda: idle(client), 10, what="reservation released")


def test_streamed_mode_routes_on_load_before_the_body(picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    env = Envoy(target)
    try:
        env.send(request_headers(mode=PM.STREAMED))
        r = env.recv()  # Envoy streams the body only after this: the choice cannot wait for it
        dest = header_value(r.request_headers.response, "x-gateway-destination-endpoint")
        assert dest in ENDPOINTS.values()
        env.send(body_chunks(completion(tokens(24, 64)), 1 << 20)[0])
        b = env.recv()
        assert b.WhichOneof("response") == "request_body"
        assert not b.request_body.response.HasField("body_mutation")  # passed through
        assert idle(client)  # nothing to reserve without a prompt
    finally:
        env.close()


def test_a_body_over_the_limit_is_413_and_a_message_without_phase_400(
        picker: tuple[RouterClient, str]) -> None:
    client, target = picker
    env = Envoy(target)
    try:
        env.send(request_headers())
        for chunk in body_chunks(b"x" * (MAX_BODY + 1), 32 * 1024, last_eos=False):
            env.send(chunk)
        r = env.recv()
        assert r.immediate_response.status.code == 413
        assert env.rest() == []
    finally:
        env.close()
    env = Envoy(target)
    try:
        env.send(pb.ProcessingRequest())  # no phase set
        r = env.recv()
        assert r.immediate_response.status.code == 400
        assert env.rest() == []
    finally:
        env.close()
    assert idle(client)


def test_serve_refuses_a_bad_or_taken_ext_proc_address(picker: tuple[RouterClient, str],
                                                       kvrouter_cli: Callable[..., Any]) -> None:
    _, taken = picker  # the module's picker holds this port
    out = kvrouter_cli("serve", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                       "--ext-proc", "no-port")
    assert out.returncode == 2 and "--ext-proc" in out.stderr
    out = kvrouter_cli("serve", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                       "--ext-proc", taken)
    assert out.returncode == 1 and f"cannot listen on {taken}" in out.stderr
