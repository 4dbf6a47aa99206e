"""Fuzz every RPC (issue 13, item 6): random well-formed protobufs (edge values, NaN,
2^63, control characters, megabyte strings, unknown enum values) and raw bytes to every
method of the Router and the sim Engine, and random msgpack event payloads.

Checked for every call: the answer is never UNKNOWN or INTERNAL (an unhandled
exception); a refused call changes no worker's registration or index; the router and the
engine keep serving, and the real engine is still registered, routable and answering
Generate at the end. Real processes over loopback gRPC. The seed is fixed so a failure
reproduces; KVROUTER_FUZZ_SEED and KVROUTER_FUZZ_ROUNDS widen a local run.
"""

from __future__ import annotations

import math
import os
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import grpc
import msgpack
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from kvrouter._proto.v1 import engine_pb2, router_pb2, router_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.processes import RouterProcess, SimEngineProcess, start_sim_engine

BS = 4
MODEL = "default"
PROMPT = list(range(100, 132))
SEED = int(os.environ.get("KVROUTER_FUZZ_SEED", "1313"))
ROUNDS = int(os.environ.get("KVROUTER_FUZZ_ROUNDS", "12"))
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Names the fuzzer may use: decoys and the model, never the real engine's name, so a
# well-formed Drain/Deregister cannot take the real engine away (that is the admin role's
# right, and issue 13's auth work decides who has it).
NAMES = ["default", "w-fuzz-1", "w-fuzz-2", "", "nope"]

_I64 = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**53 + 1]
_U64 = [0, 1, 2**32 - 1, 2**63, 2**64 - 1]
_FLOATS = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 5e-324]


def _string(rng: random.Random) -> str:
    pick = rng.randrange(7)
    if pick < 3:
        return rng.choice(NAMES)
    if pick == 3:
        return "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(1, 24)))
    if pick == 4:
        return "\x1b[31m\x00\r\n" + "x" * rng.randrange(0, 8)
    if pick == 5:
        return "y" * rng.choice([300, 5000, 200_000])
    return "127.0.0.1:1"


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([*_I64, rng.randrange(-1000, 100_000)])
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([0, 1, -1, 2**31 - 1, -(2**31), rng.randrange(-100, 10_000)])
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([*_U64, rng.randrange(0, 100_000)])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1, rng.randrange(0, 100_000)])
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        value = rng.choice([*_FLOATS, rng.uniform(-10, 10)])
        return value if t == FieldDescriptor.TYPE_DOUBLE or not math.isfinite(value) \
            or abs(value) < 3e38 else 3e38
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_STRING:
        return _string(rng)
    if t == FieldDescriptor.TYPE_BYTES:
        if rng.random() < 0.5:
            return _payload(rng)
        return rng.randbytes(rng.choice([0, 1, 7, 64, 4096]))
    if t == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers arrive as plain ints.
        assert field.enum_type is not None
        values = [v.number for v in field.enum_type.values]
        return rng.choice([*values, 99, -1])
    raise AssertionError(f"unhandled field type {t} ({field.full_name})")


def _payload(rng: random.Random) -> bytes:
    """A random msgpack document shaped loosely like an event batch."""
    def value(depth: int) -> Any:
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return rng.choice([*_I64[:6], 2**64 - 1, None, True])
        if kind == 1:
            return rng.choice(_FLOATS)
        if kind == 2:
            return rng.choice(["stored", "removed", "cleared", "gpu", "host", "", "\x00"])
        if kind == 3:
            return rng.randbytes(rng.randrange(0, 16))
        if kind in (4, 5):
            return [value(depth + 1) for _ in range(rng.randrange(0, 6))]
        return {rng.choice(["type", "block_hashes", "parent_block_hash", "token_ids", "tier",
                            "lora_id", "x"]): value(depth + 1) for _ in range(rng.randrange(0, 5))}
    return bytes(msgpack.packb(value(0), use_bin_type=True))


def random_message(desc: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    msg = GetMessageClass(desc)()
    for field in desc.fields:
        if rng.random() < 0.4:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = getattr(msg, field.name)
            key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(rng.randrange(0, 4)):
                entry[_scalar(key_f, rng)] = _scalar(val_f, rng)
            continue
        repeated = field.is_repeated
        count = rng.choice([0, 1, 3, 40, 2000]) if repeated else 1
        if field.message_type is not None:
            if depth >= 3:
                continue
            if repeated:
                for _ in range(min(count, 8)):
                    getattr(msg, field.name).add().CopyFrom(random_message(field.message_type, rng, depth + 1))
            else:
                getattr(msg, field.name).CopyFrom(random_message(field.message_type, rng, depth + 1))
        elif repeated:
            getattr(msg, field.name).extend(_scalar(field, rng) for _ in range(count))
        else:
            setattr(msg, field.name, _scalar(field, rng))
    return msg


# Fields a well-formed request would carry, by name; a sane message mutated in one or two
# fields reaches the checks behind decoding (model lookup, scoring, the engines).
_SANE: dict[str, Callable[[], Any]] = {
    "model": lambda: MODEL,
    "token_ids": lambda: PROMPT,
    "request_id": lambda: f"fz-{uuid.uuid4().hex[:8]}",
    "worker": lambda: "w-fuzz-1",
    "seq": lambda: 1,
    "max_tokens": lambda: 2,
    "block_size": lambda: BS,
    "epoch": lambda: "e1",
}


def sane_message(desc: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    msg = GetMessageClass(desc)()
    for field in desc.fields:
        if field.name in _SANE:
            value = _SANE[field.name]()
            if field.is_repeated:
                getattr(msg, field.name).extend(value)
            else:
                setattr(msg, field.name, value)
        elif field.message_type is not None and depth < 3 and not field.message_type.GetOptions().map_entry:
            if field.containing_oneof is not None and field is not field.containing_oneof.fields[0]:
                continue  # the first member of a oneof (RouteStreamItem.route) stands for it
            sub = sane_message(field.message_type, rng, depth + 1)
            if field.is_repeated:
                getattr(msg, field.name).add().CopyFrom(sub)
            else:
                getattr(msg, field.name).CopyFrom(sub)
    return msg


def mutated_message(desc: Descriptor, rng: random.Random) -> Message:
    """A sane message with one or two fields, at any depth, replaced by random values."""
    msg = sane_message(desc, rng)
    for _ in range(rng.choice([1, 1, 2])):
        target, tdesc = msg, desc
        while tdesc.fields:
            field = rng.choice(tdesc.fields)
            if field.message_type is None or field.is_repeated or field.message_type.GetOptions().map_entry \
                    or rng.random() < 0.4:
                break
            target, tdesc = getattr(target, field.name), field.message_type
        else:
            continue
        # Copy the field from a random message of the same type (unset there: cleared here).
        source = random_message(tdesc, rng)
        target.ClearField(field.name)
        if field.is_repeated or field.message_type is not None:
            scratch = GetMessageClass(tdesc)()
            getattr(scratch, field.name).MergeFrom(getattr(source, field.name))
            target.MergeFrom(scratch)
        else:
            setattr(target, field.name, getattr(source, field.name))
    return msg


def _garbage(desc: Descriptor, rng: random.Random) -> bytes:
    cls = GetMessageClass(desc)
    while True:
        data = rng.randbytes(rng.randrange(4, 96))
        try:
            cls.FromString(data)
        except DecodeError:
            return data


# ------------------------------------------------------------------ the fleet under test
@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., RouterProcess],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    router = module_router_server({"router": {"heartbeat_timeout_s": 0},
                                   "models": [{"name": MODEL, "block_size": BS},
                                              {"name": "unicode", "block_size": BS}]})
    name = f"sim-{uuid.uuid4().hex[:6]}"
    engine: SimEngineProcess = start_sim_engine(
        tmp_path_factory.mktemp("engines"), name, router=router.target,
        args=("--time-scale", "0.02"))
    try:
        yield {"router": router, "engine": engine, "engine_name": name}
    finally:
        engine.stop()


def _fingerprint(target: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    """What a refused call must not change: each worker's registration and index size.
    Load and liveness move on their own and are left out, and so does the index size of
    the real engine (its events for an earlier successful Generate arrive when they do)."""
    with RouterClient(target) as c:
        return {(w.model, w.name): (w.address, w.role, w.status, w.routable,
                                    None if w.address else w.cached_blocks)
                for w in c.list_workers()}


def _call(channel: grpc.Channel, method: MethodDescriptor, service: str, request: bytes) -> grpc.StatusCode:
    path = f"/{service}/{method.name}"
    kind = (channel.stream_stream if method.client_streaming else channel.unary_stream) \
        if method.server_streaming else channel.unary_unary
    call = kind(path, request_serializer=None, response_deserializer=None)
    try:
        if method.client_streaming:
            responses = call(iter([request]), timeout=15)
        else:
            responses = call(request, timeout=15)
        if method.server_streaming:
            # Read a few messages, then hang up: a fuzzed max_tokens may be huge.
            for i, _ in enumerate(responses):
                if i >= 3:
                    responses.cancel()
                    break
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _methods(service: str) -> list[MethodDescriptor]:
    pool_file = router_pb2 if service.endswith("Router") else engine_pb2
    return list(pool_file.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods)


def _fuzz(target: str, service: str, rounds: int, rng: random.Random,
          fingerprint: Callable[[], dict[Any, Any]] | None) -> dict[str, dict[str, int]]:
    seen: dict[str, dict[str, int]] = {}
    bad: list[str] = []
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        for method in _methods(service):
            codes = seen.setdefault(method.name, {})
            for i in range(rounds):
                kind = i % 4  # 0, 1: mutated sane message; 2: random message; 3: raw bytes
                data = _garbage(method.input_type, rng) if kind == 3 else \
                    (random_message if kind == 2 else mutated_message)(method.input_type, rng).SerializeToString()
                before = fingerprint() if fingerprint else None
                code = _call(ch, method, service, data)
                codes[code.name] = codes.get(code.name, 0) + 1
                if code in FORBIDDEN:
                    bad.append(f"{method.name}: {code.name} for {data[:120]!r}")
                elif code != grpc.StatusCode.OK and fingerprint and before is not None \
                        and code != grpc.StatusCode.CANCELLED:
                    after = fingerprint()
                    if after != before:
                        bad.append(f"{method.name}: refused with {code.name} but changed state "
                                   f"{set(after.items()) ^ set(before.items())}")
    assert not bad, "\n".join(bad[:10])
    return seen


def _engine_still_serves(fleet: dict[str, Any]) -> None:
    target, name = fleet["router"].target, fleet["engine_name"]
    with RouterClient(target) as c:
        mine = [w for w in c.list_workers(MODEL) if w.name == name]
        assert mine and mine[0].routable and mine[0].address == fleet["engine"].address, mine
        assert c.route(PROMPT, MODEL, candidates=[name], dry_run=True).worker == name
    req = router_pb2.RouterGenerateRequest(model=MODEL, token_ids=PROMPT)
    req.sampling.max_tokens = 2
    with grpc.insecure_channel(target) as ch:
        out = list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=30))
    assert out and out[-1].finished


def test_fuzz_router_rpcs(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    seen = _fuzz(target, "kvrouter.v1.Router", ROUNDS, random.Random(SEED),
                 lambda: _fingerprint(target))
    # The fuzzer must reach past decoding: some call of each kind is refused for a
    # reason other than the bytes, and the cheap reads succeed.
    assert all(sum(c.values()) == ROUNDS for c in seen.values()), seen
    assert seen["ListModels"].get("OK", 0) > 0, seen
    assert any(c.get("INVALID_ARGUMENT", 0) for c in seen.values()), seen
    _engine_still_serves(fleet)


def test_fuzz_engine_rpcs(fleet: dict[str, Any]) -> None:
    seen = _fuzz(fleet["engine"].address, "kvrouter.v1.Engine", ROUNDS, random.Random(SEED + 1), None)
    assert seen["Stats"].get("OK", 0) > 0, seen
    _engine_still_serves(fleet)


def test_fuzz_event_payloads(fleet: dict[str, Any]) -> None:
    """Random msgpack payloads published for a decoy worker: each is refused or applied
    whole; the real engine's index entries are untouched."""
    target, name = fleet["router"].target, fleet["engine_name"]
    rng = random.Random(SEED + 2)
    with RouterClient(target) as c:
        c.register_worker(MODEL, "w-fuzz-events", block_size=BS)
        real_before = {w.name: w.cached_blocks for w in c.list_workers(MODEL)}[name]
        codes: dict[str, int] = {}
        for seq in range(ROUNDS * 4):
            try:
                c.publish_events(MODEL, "w-fuzz-events", "epoch-1", seq, _payload(rng))
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                assert err.code() not in FORBIDDEN, (err.code(), err.details())
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
        real_after = {w.name: w.cached_blocks for w in c.list_workers(MODEL)}[name]
    assert real_after == real_before
    assert sum(codes.values()) == ROUNDS * 4
    _engine_still_serves(fleet)


def test_generate_metadata_carries_any_worker_name(fleet: dict[str, Any]) -> None:
    """Found by the fuzzer: a valid non-ASCII worker name in Generate's trailing metadata
    ended the call with INTERNAL ("Invalid metadata"). Values travel percent-encoded."""
    name = "wörker-ü1"
    with RouterClient(fleet["router"].target) as c:
        c.register_worker("unicode", name, address="127.0.0.1:1", block_size=BS)
    req = router_pb2.RouterGenerateRequest(model="unicode", token_ids=PROMPT)
    req.sampling.max_tokens = 2
    with grpc.insecure_channel(fleet["router"].target) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(req, timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    md = dict(e.value.trailing_metadata() or ())
    assert unquote(md["kvrouter-worker"]) == name
