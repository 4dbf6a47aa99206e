"""Hostile registration and load inputs (issue 13, findings 4, 5 and 7) against a real
`kvrouter serve`: a refused request changes nothing, no value makes a reply overflow its
proto field, and no worker can make ListWorkers or an error message too large."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import router_pb2
from kvrouter.client import RouterClient, load_report, route_request
from kvrouter.protocol import (
    EXCERPT_CHARS,
    MAX_ADDRESS_LEN,
    MAX_EXPECTED_OUTPUT_TOKENS,
    MAX_LOAD_VALUE,
    MAX_METADATA_BYTES,
    MAX_METADATA_KEY_BYTES,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_BYTES,
    MAX_NAME_LEN,
)
from kvrouter.testing.wait import wait_until

BS = 4
MODEL = "m"
PROMPT = list(range(100, 132))
I64_MAX = (1 << 63) - 1
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def router(router_server: Callable[..., Any]) -> Any:
    # Liveness off: these workers never heartbeat, and a registered worker must stay
    # listed so that "nothing registered" is a real check.
    return router_server({"router": {"heartbeat_timeout_s": 0},
                          "models": [{"name": MODEL, "block_size": BS}]})


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details() or ""


def _names(c: RouterClient) -> list[str]:
    return [w.name for w in c.list_workers(MODEL)]


# --------------------------------------------------------------------------- finding 4

@pytest.mark.parametrize("name", ["a b", "tab\tname", "x{y}", "w" * (MAX_NAME_LEN + 1)])
def test_invalid_name_registers_nothing(router: Any, name: str) -> None:
    with RouterClient(router.target) as c:
        c.register_worker(MODEL, "good", block_size=BS)
        code, details = _code(lambda: c.register_worker(MODEL, name, block_size=BS))
        assert code == INVALID and "invalid" in details
        # Nothing registered: not listed, never chosen.
        assert _names(c) == ["good"]
        assert {c.route(PROMPT, MODEL, dry_run=True).worker for _ in range(20)} == {"good"}
        # Admin RPCs on an invalid name: INVALID_ARGUMENT, never UNKNOWN, nothing removed.
        assert _code(lambda: c.deregister_worker(MODEL, name))[0] == INVALID
        assert _code(lambda: c.drain_worker(MODEL, name))[0] == INVALID
        assert _names(c) == ["good"]


def test_admin_rpcs_on_unknown_worker_answer_not_found(router: Any) -> None:
    with RouterClient(router.target) as c:
        c.register_worker(MODEL, "good", block_size=BS)
        for call in (lambda: c.deregister_worker(MODEL, "ghost"),
                     lambda: c.drain_worker(MODEL, "ghost")):
            code, details = _code(call)
            assert code == grpc.StatusCode.NOT_FOUND and "'ghost'" in details
        assert [(w.name, w.status) for w in c.list_workers(MODEL)] == [("good", "up")]


# --------------------------------------------------------------------------- finding 5

def test_huge_expected_output_fails_its_stream_item_only(router: Any) -> None:
    with RouterClient(router.target) as c:
        c.register_worker(MODEL, "a", block_size=BS)
        c.register_worker(MODEL, "b", block_size=BS)
        huge = route_request(PROMPT, MODEL, dry_run=True, explain=True,
                             expected_output_tokens=I64_MAX)
        fine = route_request(PROMPT, MODEL, dry_run=True, explain=True,
                             expected_output_tokens=MAX_EXPECTED_OUTPUT_TOKENS)
        msgs = [router_pb2.RouteStreamRequest(seq=s, items=[
            router_pb2.RouteStreamItem(route=r) for r in rs])
            for s, rs in enumerate([[fine, huge, fine], [fine]], start=1)]
        replies = list(c.stub.RouteStream(iter(msgs), timeout=10))
        assert [r.seq for r in replies] == [1, 2]
        first = [res.WhichOneof("result") for res in replies[0].results]
        assert first == ["route", "error", "route"]
        err = replies[0].results[1].error
        assert err.code == INVALID.value[0] and "expected_output_tokens" in err.message
        assert replies[1].results[0].route.worker in ("a", "b")
        # Unary: the same refusal, and the largest accepted value explains fine.
        assert _code(lambda: c.stub.Route(route_request(
            PROMPT, MODEL, expected_output_tokens=MAX_EXPECTED_OUTPUT_TOKENS + 1)))[0] == INVALID
        assert len(c.explain(PROMPT, MODEL, expected_output_tokens=MAX_EXPECTED_OUTPUT_TOKENS,
                             ).candidates) == 2


def test_huge_heartbeat_load_is_clamped(router: Any) -> None:
    with RouterClient(router.target) as c:
        c.register_worker(MODEL, "a", block_size=BS)
        c.register_worker(MODEL, "b", block_size=BS)
        c.heartbeat(MODEL, "a", load_report(I64_MAX, I64_MAX, I64_MAX, I64_MAX, I64_MAX))
        # The plane applies the report asynchronously; ListWorkers answers OK meanwhile.
        wait_until(lambda: {w.name: w for w in c.list_workers(MODEL)}["a"].reported_running,
                   10, what="the load report to be applied", procs=[router])
        # Reservations on top of the reported load, on the worker that reported it.
        for i in range(3):
            c.route(PROMPT, MODEL, candidates=["a"], request_id=f"r{i}",
                    expected_output_tokens=MAX_EXPECTED_OUTPUT_TOKENS)
        a = {w.name: w for w in c.list_workers(MODEL)}["a"]
        assert (a.reported_running, a.reported_queued) == (MAX_LOAD_VALUE, MAX_LOAD_VALUE)
        assert 0 < a.queue <= I64_MAX and 0 < a.decode_blocks <= I64_MAX
        cands = {x.worker: x for x in c.explain(PROMPT, MODEL).candidates}
        assert cands["a"].queue >= MAX_LOAD_VALUE
        # The absurd report steers routing away from a, it does not break it.
        assert c.route(PROMPT, MODEL, dry_run=True).worker == "b"


# --------------------------------------------------------------------------- finding 7

BIG = "v" * (MAX_METADATA_VALUE_BYTES + 1)

@pytest.mark.parametrize("metadata,what", [
    ({f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}, "keys"),
    ({"k" * (MAX_METADATA_KEY_BYTES + 1): "v"}, "metadata key"),
    ({"k": BIG}, "metadata value"),
    ({f"k{i}": "v" * MAX_METADATA_VALUE_BYTES for i in range(MAX_METADATA_BYTES
                                                             // MAX_METADATA_VALUE_BYTES)},
     "bytes"),
])
def test_metadata_limits(router: Any, metadata: dict[str, str], what: str) -> None:
    with RouterClient(router.target) as c:
        code, details = _code(lambda: c.register_worker(MODEL, "w", metadata=metadata))
        assert code == INVALID and what in details and len(details) < 400
        assert _names(c) == []


def test_metadata_merge_stays_within_limits(router: Any) -> None:
    """Re-registration merges metadata: many small registrations cannot add up."""
    with RouterClient(router.target) as c:
        for i in range(MAX_METADATA_KEYS):
            c.register_worker(MODEL, "w", metadata={f"k{i}": "v"})
        code, details = _code(lambda: c.register_worker(MODEL, "w", metadata={"one": "more"}))
        assert code == INVALID and "keys" in details
        [w] = c.list_workers(MODEL)
        assert len(w.metadata) == MAX_METADATA_KEYS and "one" not in w.metadata


def test_oversized_name_and_address_are_not_echoed(router: Any) -> None:
    with RouterClient(router.target) as c:
        name = "n" * 1_000_000
        code, details = _code(lambda: c.register_worker(MODEL, name))
        assert code == INVALID and str(len(name)) in details and len(details) < 400
        assert "n" * (EXCERPT_CHARS + 1) not in details
        for call in (lambda: c.deregister_worker(MODEL, name),
                     lambda: c.list_workers(name),
                     lambda: c.heartbeat(MODEL, name),
                     lambda: c.route(PROMPT, MODEL, candidates=[name])):
            code, details = _code(call)
            assert code in (INVALID, grpc.StatusCode.NOT_FOUND) and len(details) < 400
        address = "h" * (MAX_ADDRESS_LEN + 1)
        code, details = _code(lambda: c.register_worker(MODEL, "w", address=address))
        assert code == INVALID and "address" in details and len(details) < 400
        assert _names(c) == []


def test_list_workers_with_many_full_workers(router: Any) -> None:
    """Workers at every metadata limit: ListWorkers stays well under the message limit."""
    full = {f"k{i:02d}": "v" * (MAX_METADATA_BYTES // MAX_METADATA_KEYS - 3)
            for i in range(MAX_METADATA_KEYS)}
    with RouterClient(router.target) as c:
        for i in range(64):
            c.register_worker(MODEL, f"w{i:02d}", address="h" * MAX_ADDRESS_LEN, metadata=full)
        workers = c.list_workers(MODEL)
        assert len(workers) == 64 and all(w.metadata == full for w in workers)
