"""Bad requests get a clear status and change neither the index nor the load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.client import RouterClient, tokens_le

BS = 4
MODEL = "m"
VOCAB = 1000
PROMPT = list(range(100, 132))
MAX_TOKENS = 4096
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(module_router_server: Callable[..., Any], block_store_class: type) -> Any:
    cfg = {"router": {"max_prompt_tokens": MAX_TOKENS, "max_message_bytes": MAX_BYTES,
                      "heartbeat_timeout_s": 0},
           "models": [{"name": MODEL, "block_size": BS, "vocab_size": VOCAB}]}
    rp = module_router_server(cfg)
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "w1", block_size=BS)
        c.register_worker(MODEL, "w2", block_size=BS)
        block_store_class()(c, MODEL, "w1", PROMPT, BS)
        c.route(PROMPT, MODEL, request_id="held", candidates=["w2"], expected_output_tokens=32)
    return rp


def _state(c: RouterClient) -> tuple[Any, ...]:
    workers = tuple((w.name, w.status, w.cached_blocks, w.reserved_requests,
                     w.reserved_prefill_tokens, w.reserved_decode_blocks)
                    for w in c.list_workers())
    models = tuple((m.name, m.indexed_blocks, m.workers) for m in c.list_models())
    return workers, models


def _route(**kw: Any) -> router_pb2.RouteRequest:
    kw.setdefault("model", MODEL)
    return router_pb2.RouteRequest(**kw)


Call = Callable[[router_pb2_grpc.RouterStub], Any]

CASES: list[tuple[str, Call, grpc.StatusCode, tuple[str, ...]]] = [
    ("empty tokens", lambda s: s.Route(_route()), grpc.StatusCode.INVALID_ARGUMENT,
     ("empty",)),
    ("empty tokens le", lambda s: s.Route(_route(token_ids_le=b"")),
     grpc.StatusCode.INVALID_ARGUMENT, ("empty",)),
    ("unknown model", lambda s: s.Route(_route(model="nope", token_ids=PROMPT)),
     grpc.StatusCode.NOT_FOUND, ("unknown model", "'nope'")),
    ("token id out of range", lambda s: s.Route(_route(token_ids=[*PROMPT, 5000])),
     grpc.StatusCode.INVALID_ARGUMENT, ("5000", "position 32", "vocab_size 1000")),
    ("token id out of range le", lambda s: s.Route(_route(token_ids_le=tokens_le([1, VOCAB]))),
     grpc.StatusCode.INVALID_ARGUMENT, (str(VOCAB), "vocab_size")),
    ("ragged token bytes", lambda s: s.Route(_route(token_ids_le=b"\x01\x00\x00")),
     grpc.StatusCode.INVALID_ARGUMENT, ("multiple of 4",)),
    ("both token forms", lambda s: s.Route(_route(token_ids=PROMPT,
                                                  token_ids_le=tokens_le(PROMPT))),
     grpc.StatusCode.INVALID_ARGUMENT, ("not both",)),
    ("negative expected output", lambda s: s.Route(_route(token_ids=PROMPT,
                                                          expected_output_tokens=-5)),
     grpc.StatusCode.INVALID_ARGUMENT, ("expected_output_tokens", "-5")),
    ("unknown policy", lambda s: s.Route(_route(token_ids=PROMPT, policy="fastest")),
     grpc.StatusCode.INVALID_ARGUMENT, ("fastest",)),
    ("unknown candidate", lambda s: s.Route(_route(token_ids=PROMPT, candidates=["w9"])),
     grpc.StatusCode.NOT_FOUND, ("'w9'",)),
    ("duplicate request id", lambda s: s.Route(_route(token_ids=PROMPT, request_id="held")),
     grpc.StatusCode.ALREADY_EXISTS, ("'held'",)),
    ("too many tokens", lambda s: s.Route(_route(token_ids=[1] * (MAX_TOKENS + 1))),
     grpc.StatusCode.INVALID_ARGUMENT, ("max_prompt_tokens",)),
    # Over the gRPC message limit the transport itself refuses, before any handler runs.
    ("oversized message", lambda s: s.Route(_route(token_ids_le=b"\x01\x00\x00\x00" * 20000)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ("larger than max",)),
    ("explain unknown model", lambda s: s.Explain(router_pb2.ExplainRequest(
        route=_route(model="nope", token_ids=PROMPT))), grpc.StatusCode.NOT_FOUND, ("'nope'",)),
    ("release unknown worker", lambda s: s.Release(router_pb2.ReleaseRequest(
        model=MODEL, request_id="held", worker="ghost")),
     grpc.StatusCode.NOT_FOUND, ("unknown worker", "'ghost'")),
    ("release without id", lambda s: s.Release(router_pb2.ReleaseRequest(model=MODEL)),
     grpc.StatusCode.INVALID_ARGUMENT, ("request_id",)),
    ("release unknown model", lambda s: s.Release(router_pb2.ReleaseRequest(
        model="nope", request_id="held")), grpc.StatusCode.NOT_FOUND, ("'nope'",)),
    ("prefill done unknown worker", lambda s: s.MarkPrefillDone(
        router_pb2.MarkPrefillDoneRequest(model=MODEL, request_id="held", worker="ghost")),
     grpc.StatusCode.NOT_FOUND, ("'ghost'",)),
    ("negative load report", lambda s: s.Heartbeat(router_pb2.HeartbeatRequest(
        model=MODEL, worker="w1", load=common_pb2.LoadReport(running=1, queued=-3))),
     grpc.StatusCode.INVALID_ARGUMENT, ("load.queued", "-3")),
    ("heartbeat unknown worker", lambda s: s.Heartbeat(router_pb2.HeartbeatRequest(
        model=MODEL, worker="ghost")), grpc.StatusCode.NOT_FOUND, ("'ghost'",)),
    ("register negative block size", lambda s: s.RegisterWorker(
        router_pb2.RegisterWorkerRequest(model=MODEL, worker="w3", block_size=-16)),
     grpc.StatusCode.INVALID_ARGUMENT, ("block_size",)),
    ("register empty name", lambda s: s.RegisterWorker(
        router_pb2.RegisterWorkerRequest(model=MODEL, worker="")),
     grpc.StatusCode.INVALID_ARGUMENT, ("worker name",)),
    ("register unknown model", lambda s: s.RegisterWorker(
        router_pb2.RegisterWorkerRequest(model="nope", worker="w3")),
     grpc.StatusCode.NOT_FOUND, ("'nope'",)),
    ("events for unknown worker", lambda s: s.PublishEvents(router_pb2.PublishEventsRequest(
        model=MODEL, worker="ghost", epoch="e", seq=0, payload=b"\x90")),
     grpc.StatusCode.NOT_FOUND, ("'ghost'",)),
    ("malformed events", lambda s: s.PublishEvents(router_pb2.PublishEventsRequest(
        model=MODEL, worker="w1", epoch="e", seq=99, payload=b"\xc1garbage")),
     grpc.StatusCode.INVALID_ARGUMENT, ("malformed",)),
    ("empty events", lambda s: s.PublishEvents(router_pb2.PublishEventsRequest(
        model=MODEL, worker="w1", epoch="e", seq=99)),
     grpc.StatusCode.INVALID_ARGUMENT, ("empty",)),
    ("drain unknown worker", lambda s: s.DrainWorker(router_pb2.DrainWorkerRequest(
        model=MODEL, worker="ghost")), grpc.StatusCode.NOT_FOUND, ("'ghost'",)),
    ("deregister unknown worker", lambda s: s.DeregisterWorker(
        router_pb2.DeregisterWorkerRequest(model=MODEL, worker="ghost")),
     grpc.StatusCode.NOT_FOUND, ("'ghost'",)),
    ("list workers unknown model", lambda s: s.ListWorkers(
        router_pb2.ListWorkersRequest(model="nope")), grpc.StatusCode.NOT_FOUND, ("'nope'",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server: Any, case: tuple[str, Call, grpc.StatusCode,
                                                         tuple[str, ...]]) -> None:
    _name, call, code, needles = case
    with RouterClient(server.target) as c:
        before = _state(c)
        with pytest.raises(grpc.RpcError) as e:
            call(c.stub)
        assert e.value.code() == code, e.value.details()
        details = e.value.details() or ""
        for needle in needles:
            assert needle in details, details
        assert _state(c) == before
        # The router still routes normally afterwards.
        d = c.route(PROMPT, MODEL, dry_run=True)
        assert (d.worker, d.overlap_blocks) == ("w1", 8)


def test_generate_without_engine_addresses_is_unavailable(server: Any) -> None:
    with RouterClient(server.target) as c:
        before = _state(c)
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.Generate(router_pb2.RouterGenerateRequest(model=MODEL,
                                                                  token_ids=PROMPT)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "without an engine address" in (e.value.details() or "")
        assert _state(c) == before
