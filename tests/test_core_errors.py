"""The core's typed errors (rust/src/error.rs, mapped in rust/src/python/errors.rs): one
class per failure, each also the builtin that callers caught before the classes existed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import kvrouter
from kvrouter import (
    DuplicateRequest,
    InvalidArgument,
    KvrouterError,
    MalformedPayload,
    NoRoutableWorker,
    PrefixIndex,
    Scheduler,
    SnapshotError,
    UnknownPolicy,
    UnknownWorker,
    decode_payload,
    hash_blocks,
)

BS = 4


class Boom(Exception):
    pass


def raises_midway(n: int = 3) -> Iterator[int]:
    yield from range(n)
    raise Boom("the iterable's own error")


@pytest.mark.parametrize("cls, bases", [
    (UnknownWorker, (KvrouterError, KeyError, ValueError)),
    (NoRoutableWorker, (KvrouterError, ValueError)),
    (InvalidArgument, (KvrouterError, ValueError)),
    (UnknownPolicy, (InvalidArgument,)),
    (DuplicateRequest, (InvalidArgument,)),
    (MalformedPayload, (InvalidArgument,)),
    (SnapshotError, (KvrouterError, ValueError)),
])
def test_hierarchy(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    assert cls.__module__ == "kvrouter._core"
    assert cls.__name__ in kvrouter.__all__
    for base in bases:
        assert issubclass(cls, base)
    assert not issubclass(NoRoutableWorker, KeyError)
    assert not issubclass(SnapshotError, InvalidArgument)


def test_unknown_worker_is_one_exception_everywhere() -> None:
    s = Scheduler(PrefixIndex(BS), seed=0)
    calls: list[Callable[[], object]] = [
        lambda: s.reserve(7, "r1", 1, 1),
        lambda: s.set_routable(7, False),
        lambda: s.report_load(7, 0, 0, 0, 0),
        lambda: s.set_external_load(7, 0, 0, 0),
        lambda: s.load(7),
    ]
    for call in calls:
        with pytest.raises(UnknownWorker) as e:
            call()
        # The plain message, not KeyError's quoted repr.
        assert str(e.value) == "unknown worker 7"


def test_route_errors_name_their_cause() -> None:
    idx = PrefixIndex(BS)
    s = Scheduler(idx, seed=0)
    with pytest.raises(NoRoutableWorker):
        s.route([1, 2, 3, 4])
    s.add_worker(1)
    with pytest.raises(NoRoutableWorker):
        s.route([1, 2, 3, 4], candidates=[2])
    with pytest.raises(UnknownPolicy, match="expected one of kv, prefix_only"):
        s.route([1, 2, 3, 4], policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="prompt has no tokens"):
        s.route([])
    s.route([1, 2, 3, 4], request_id="a")
    with pytest.raises(DuplicateRequest, match="already holds a reservation"):
        s.route([1, 2, 3, 4], request_id="a")
    with pytest.raises(DuplicateRequest):
        s.reserve(1, "a", 1, 1)


def test_settings_errors() -> None:
    idx = PrefixIndex(BS)
    with pytest.raises(UnknownPolicy):
        Scheduler(idx, policy="nope")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="host_credit"):
        Scheduler(idx, host_credit=2.0)
    s = Scheduler(idx)
    with pytest.raises(InvalidArgument, match="lease_s"):
        s.configure(lease_s=-1.0)
    with pytest.raises(InvalidArgument, match="decode_weight"):
        s.configure(decode_weight=float("nan"))


def test_snapshot_and_payload_errors() -> None:
    idx = PrefixIndex(BS)
    with pytest.raises(SnapshotError):
        idx.load_snapshot(b"garbage")
    with pytest.raises(SnapshotError, match="block size"):
        idx.load_snapshot(PrefixIndex(BS * 2).snapshot())
    with pytest.raises(SnapshotError, match="no entry in the worker map"):
        idx.apply_stored(1, [1], router_hashes=[5])
        idx.load_snapshot(idx.snapshot(), worker_map={})
    with pytest.raises(MalformedPayload):
        decode_payload(b"\x91\x80")
    r = idx.apply_payload(1, b"\x91\x80")
    assert r.malformed == 1 and r.error == "event 0: event without a type"


@pytest.mark.parametrize("call", [
    lambda idx, s: hash_blocks(raises_midway(), BS),
    lambda idx, s: idx.find_matches_tokens(raises_midway()),
    lambda idx, s: idx.find_matches(raises_midway()),
    lambda idx, s: idx.find_matches_batch([1, 2] for _ in raises_midway()),
    lambda idx, s: idx.apply_stored(1, raises_midway(), router_hashes=[1, 2, 3]),
    lambda idx, s: idx.apply_stored(1, [1], token_ids=raises_midway(4)),
    lambda idx, s: idx.apply_payloads((1, b"\x90") for _ in raises_midway()),
    lambda idx, s: s.route(raises_midway(8)),
    lambda idx, s: s.route_hashes(raises_midway(), 8),
], ids=["hash_blocks", "find_matches_tokens", "find_matches", "find_matches_batch",
        "apply_stored hashes", "apply_stored tokens", "apply_payloads", "route", "route_hashes"])
def test_an_iterable_that_raises_surfaces_its_own_exception(
        call: Callable[[PrefixIndex, Scheduler], object]) -> None:
    idx = PrefixIndex(BS)
    s = Scheduler(idx, seed=0)
    s.add_worker(1)
    with pytest.raises(Boom, match="the iterable's own error"):
        call(idx, s)
    assert idx.num_entries() == 0
