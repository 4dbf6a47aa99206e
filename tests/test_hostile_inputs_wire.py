"""Hostile inputs on the wire (issue 13, findings 6 and 9): undecodable requests answer
INVALID_ARGUMENT on every service, bad sampling parameters are refused before anything is
reserved, Release checks the worker it is given, and `kvrouter workers` never prints
control characters. Real processes over loopback gRPC."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from kvrouter._proto.v1 import (
    common_pb2,
    engine_pb2,
    engine_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from kvrouter.client import RouterClient
from kvrouter.testing.processes import RouterProcess, SimEngineProcess, start_sim_engine

BS = 4
MODEL = "default"
PROMPT = list(range(100, 132))


@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., RouterProcess],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A router (no heartbeat expiry) with one sim engine and two address-less workers."""
    router = module_router_server({"router": {"heartbeat_timeout_s": 0},
                                   "models": [{"name": MODEL, "block_size": BS}]})
    engine: SimEngineProcess = start_sim_engine(
        tmp_path_factory.mktemp("engines"), f"sim-{uuid.uuid4().hex[:6]}",
        router=router.target, args=("--time-scale", "0.05"))
    try:
        with RouterClient(router.target) as c:
            c.register_worker(MODEL, "w1", block_size=BS)
            c.register_worker(MODEL, "w2", block_size=BS)
        yield {"router": router, "engine": engine}
    finally:
        engine.stop()


# ------------------------------------------------------------------ undecodable requests
def _undecodable(message_type: Any) -> list[bytes]:
    """Random byte strings that `message_type` cannot parse, and one valid message whose
    string field holds invalid UTF-8."""
    rng = random.Random(13)
    out: list[bytes] = []
    while len(out) < 3:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(8, 64)))
        try:
            message_type.FromString(data)
        except DecodeError:
            out.append(data)
    # Field 1 is a string in every request type used here (model / request_id / ...).
    field = message_type.DESCRIPTOR.fields_by_number[1]
    assert field.type == field.TYPE_STRING, message_type
    valid = message_type(**{field.name: "ZZZZ"}).SerializeToString()
    bad_utf8 = valid.replace(b"ZZZZ", b"\xff\xfeZZ")
    with pytest.raises(DecodeError):
        message_type.FromString(bad_utf8)
    return [*out, bad_utf8]


ROUTER = "/kvrouter.v1.Router/"
ENGINE = "/kvrouter.v1.Engine/"
UNARY_RPCS = [
    (ROUTER + "Route", router_pb2.RouteRequest),
    (ROUTER + "Release", router_pb2.ReleaseRequest),
    (ROUTER + "ListWorkers", router_pb2.ListWorkersRequest),
    (ROUTER + "RegisterWorker", router_pb2.RegisterWorkerRequest),
    (ROUTER + "PublishEvents", router_pb2.PublishEventsRequest),
    (ROUTER + "ResumeSession", router_pb2.ResumeSessionRequest),
]


def _assert_invalid(err: grpc.RpcError, method: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.code(), err.details())
    assert "cannot be decoded" in (err.details() or ""), err.details()
    assert method in (err.details() or "")


@pytest.mark.parametrize("method,message_type", UNARY_RPCS,
                         ids=[m.split("/")[-1] for m, _ in UNARY_RPCS])
def test_undecodable_unary_requests_are_invalid_argument(
        fleet: dict[str, Any], method: str, message_type: Any) -> None:
    with grpc.insecure_channel(fleet["router"].target) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        for data in _undecodable(message_type):
            with pytest.raises(grpc.RpcError) as e:
                call(data, timeout=10)
            _assert_invalid(e.value, method)
        # The router still answers well-formed requests.
        router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=10)


def test_undecodable_streaming_requests_are_invalid_argument(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    with grpc.insecure_channel(target) as ch:
        gen = ch.unary_stream(ROUTER + "Generate", request_serializer=None,
                              response_deserializer=None)
        for data in _undecodable(router_pb2.RouterGenerateRequest):
            with pytest.raises(grpc.RpcError) as e:
                list(gen(data, timeout=10))
            _assert_invalid(e.value, ROUTER + "Generate")
        stream = ch.stream_stream(ROUTER + "RouteStream", request_serializer=None,
                                  response_deserializer=None)
        good = router_pb2.RouteStreamRequest(seq=1, items=[router_pb2.RouteStreamItem(
            route=router_pb2.RouteRequest(model=MODEL, token_ids=PROMPT, dry_run=True))])
        # RouteStreamRequest's field 1 is a number: invalid UTF-8 goes in a nested string.
        bad_utf8 = good.SerializeToString().replace(MODEL.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa\xf9")
        rng = random.Random(6)
        garbage = []
        while len(garbage) < 2:
            data = bytes(rng.randrange(256) for _ in range(32))
            try:
                router_pb2.RouteStreamRequest.FromString(data)
            except DecodeError:
                garbage.append(data)
        for bad in [bad_utf8, *garbage]:
            responses = stream(iter([good.SerializeToString(), bad]), timeout=10)
            # The good message is answered, then the stream ends with INVALID_ARGUMENT.
            first = router_pb2.RouteStreamResponse.FromString(next(responses))
            assert first.seq == 1 and first.results[0].route.worker
            with pytest.raises(grpc.RpcError) as e:
                next(responses)
            _assert_invalid(e.value, ROUTER + "RouteStream")


@pytest.mark.parametrize("method,message_type,streaming", [
    (ENGINE + "Offload", engine_pb2.OffloadRequest, False),
    (ENGINE + "Reload", engine_pb2.ReloadRequest, False),
    (ENGINE + "Generate", engine_pb2.GenerateRequest, True),
], ids=["Offload", "Reload", "Generate"])
def test_undecodable_engine_requests_are_invalid_argument(
        fleet: dict[str, Any], method: str, message_type: Any, streaming: bool) -> None:
    with grpc.insecure_channel(fleet["engine"].address) as ch:
        kind = ch.unary_stream if streaming else ch.unary_unary
        call = kind(method, request_serializer=None, response_deserializer=None)
        for data in _undecodable(message_type):
            with pytest.raises(grpc.RpcError) as e:
                resp = call(data, timeout=10)
                if streaming:
                    list(resp)
            _assert_invalid(e.value, method)
        engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(), timeout=10)


# ------------------------------------------------------------------ sampling parameters
def _reserved(target: str) -> int:
    with RouterClient(target) as c:
        return sum(w.reserved_requests for w in c.list_workers(MODEL))


@pytest.mark.parametrize("sampling,field", [
    (common_pb2.SamplingParams(max_tokens=4, temperature=math.nan), "temperature"),
    (common_pb2.SamplingParams(max_tokens=4, temperature=-0.5), "temperature"),
    (common_pb2.SamplingParams(max_tokens=4, temperature=math.inf), "temperature"),
    (common_pb2.SamplingParams(max_tokens=4, top_p=math.nan), "top_p"),
    (common_pb2.SamplingParams(max_tokens=4, top_p=-0.1), "top_p"),
    (common_pb2.SamplingParams(max_tokens=4, top_p=1.5), "top_p"),
    (common_pb2.SamplingParams(max_tokens=4, top_k=-1), "top_k"),
], ids=["temp-nan", "temp-neg", "temp-inf", "top_p-nan", "top_p-neg", "top_p-big", "top_k-neg"])
def test_generate_refuses_bad_sampling_before_reserving(
        fleet: dict[str, Any], sampling: common_pb2.SamplingParams, field: str) -> None:
    target = fleet["router"].target
    assert _reserved(target) == 0
    req = router_pb2.RouterGenerateRequest(model=MODEL, token_ids=PROMPT, sampling=sampling)
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=20))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert f"sampling.{field}" in (e.value.details() or "")
    assert _reserved(target) == 0


def test_generate_accepts_valid_sampling(fleet: dict[str, Any]) -> None:
    """The same router serves sane parameters (so the refusals above are the check's)."""
    req = router_pb2.RouterGenerateRequest(
        model=MODEL, token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.7, top_p=1.0, top_k=5))
    with grpc.insecure_channel(fleet["router"].target) as ch:
        out = list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=30))
    assert out and out[-1].finished


# ------------------------------------------------------------------ Release checks the worker
def test_release_with_the_wrong_worker_keeps_the_reservation(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    with RouterClient(target) as c:
        d = c.route(PROMPT, MODEL, request_id="rel-1", candidates=["w1"])
        assert d.worker == "w1"
        with pytest.raises(grpc.RpcError) as e:
            c.release("rel-1", model=MODEL, worker="w2")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'w1'" in (e.value.details() or "") and "nothing released" in e.value.details()
        assert _reserved(target) == 1
        # The same check on the stream answers an error item, not the release.
        stub = router_pb2_grpc.RouterStub(c.channel)
        resp = list(stub.RouteStream(iter([router_pb2.RouteStreamRequest(seq=7, items=[
            router_pb2.RouteStreamItem(release=router_pb2.ReleaseRequest(
                model=MODEL, request_id="rel-1", worker="w2"))])]), timeout=10))
        assert resp[0].results[0].WhichOneof("result") == "error"
        assert resp[0].results[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert _reserved(target) == 1
        # The right worker (or none) releases it.
        assert c.release("rel-1", model=MODEL, worker="w1") is True
        assert _reserved(target) == 0


# ------------------------------------------------------------------ terminal safety
def test_workers_table_escapes_control_characters(
        fleet: dict[str, Any], kvrouter_cli: Callable[..., Any]) -> None:
    target = fleet["router"].target
    name = "evil\x1b[2J\x07"
    address = "10.0.0.1:1\x1b]0;pwned\x07\x00"
    with RouterClient(target) as c:
        c.register_worker(MODEL, name, address=address, block_size=BS)
    try:
        res = kvrouter_cli("workers", "--target", target)
        assert res.returncode == 0, res.stderr
        assert "\x1b" not in res.stdout and "\x00" not in res.stdout and "\x07" not in res.stdout
        assert "evil\\x1b[2J\\x07" in res.stdout
        assert "10.0.0.1:1\\x1b]0;pwned\\x07\\x00" in res.stdout
    finally:
        with RouterClient(target) as c:
            c.deregister_worker(MODEL, name)
