"""Formats the event plane stores in Redis besides the KV payload itself
(which is kvrouter.events.codec): stream entry fields, heartbeat hash, full-dump
requests. Described for operators in docs/event-plane.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from kvrouter.events.model import LoadReport
from kvrouter.protocol import ProtocolError, check_name

# Stream entry fields (bytes, as Redis returns them).
F_WORKER = b"worker"
F_EPOCH = b"epoch"
F_SEQ = b"seq"
F_PAYLOAD = b"payload"
F_TIME = b"t"  # publisher wall clock when the batch's first event was published, integer microseconds
F_KIND = b"kind"  # absent for ordinary batches; b"dump" for entries of a full dump
F_SIG = b"sig"  # the worker's HMAC of entry_signed_parts (kvrouter.security.signing)

# (kind, model, worker, signed parts, tag or None) -> None, or why the data is rejected
Verify = Callable[[str, str, str, list[bytes], bytes | None], str | None]

KIND_DUMP = "dump"
MAX_EPOCH_LEN = 128
MAX_SEQ = (1 << 63) - 1


def parse_stream_id(sid: bytes | str) -> tuple[int, int]:
    """A Redis stream id (`<ms>-<seq>`, or `<ms>` alone for seq 0) as a comparable
    (ms, seq) pair. Raises ValueError naming the id when it is not one; callers count
    and drop what carries it, they never let it stop a loop."""
    try:
        text = sid.decode("ascii") if isinstance(sid, bytes) else sid
        ms, dash, seq = text.partition("-")
        if ms.isdecimal() and ms.isascii() and (not dash or (seq.isdecimal() and seq.isascii())):
            return int(ms), int(seq or 0)
    except (UnicodeDecodeError, AttributeError):
        pass
    raise ValueError(f"malformed Redis stream id: {sid!r}")


@dataclass(slots=True)
class Entry:
    """One stream entry: one batch of one worker's events, in its stream position."""

    model: str
    stream: str
    id: bytes
    worker: str
    epoch: str
    seq: int
    payload: bytes
    t: float = 0.0
    kind: str = ""


def entry_fields(
    worker: str, epoch: str, seq: int, payload: bytes, t: float | None = None, kind: str = ""
) -> dict[bytes, bytes]:
    fields = {
        F_WORKER: worker.encode(),
        F_EPOCH: epoch.encode(),
        F_SEQ: str(seq).encode(),
        F_PAYLOAD: payload,
        F_TIME: str(int((time.time() if t is None else t) * 1e6)).encode(),
    }
    if kind:
        fields[F_KIND] = kind.encode()
    return fields


def entry_signed_parts(model: str, fields: dict[bytes, Any]) -> list[bytes]:
    """What a stream entry's F_SIG covers: the model and every field as written (so the
    worker, epoch, seq, time, kind and payload cannot be changed or moved to another
    model). Missing optional fields count as empty."""
    g = fields.get
    return [b"entry", model.encode(), g(F_WORKER) or b"", g(F_EPOCH) or b"", g(F_SEQ) or b"",
            g(F_TIME) or b"", g(F_KIND) or b"", g(F_PAYLOAD) or b""]


def parse_entry(
    model: str, stream: str, eid: bytes, fields: Any, max_payload_bytes: int,
    verify: Verify | None = None,
) -> Entry | str:
    """An Entry, or the reason it is malformed ("envelope" or "oversize"), or, with
    `verify`, why its signature is refused ("unsigned", "bad_signature")."""
    if isinstance(fields, dict):
        d = fields
    elif isinstance(fields, list | tuple) and len(fields) % 2 == 0:
        d = dict(zip(fields[::2], fields[1::2], strict=True))
    else:
        return "envelope"
    w = d.get(F_WORKER)
    ep = d.get(F_EPOCH)
    sq = d.get(F_SEQ)
    pl = d.get(F_PAYLOAD)
    if not isinstance(w, bytes) or not isinstance(ep, bytes) or not isinstance(sq, bytes):
        return "envelope"
    if not isinstance(pl, bytes) or len(ep) > MAX_EPOCH_LEN or not ep:
        return "envelope"
    if not sq.isdigit() or len(sq) > 19:
        return "envelope"
    seq = int(sq)
    if seq > MAX_SEQ:
        return "envelope"
    try:
        worker = check_name("worker", w.decode())
        epoch = ep.decode()
    except (UnicodeDecodeError, ProtocolError):
        return "envelope"
    if len(pl) > max_payload_bytes:
        return "oversize"
    if verify is not None:
        sig = d.get(F_SIG)
        why = verify("entry", model, worker, entry_signed_parts(model, d),
                     sig if isinstance(sig, bytes) else None)
        if why is not None:
            return why
    t = 0.0
    tb = d.get(F_TIME)
    if isinstance(tb, bytes) and tb.isdigit() and len(tb) <= 19:
        t = int(tb) / 1e6
    kb = d.get(F_KIND)
    kind = kb.decode(errors="replace") if isinstance(kb, bytes) else ""
    return Entry(model, stream, bytes(eid), worker, epoch, seq, pl, t, kind)


# Heartbeat hash fields -----------------------------------------------------
H_META = b"meta"  # msgpack map: role, address, block_size, epoch, seq, host, pid
H_LOAD = b"load"  # msgpack array: running, queued, kv_used, kv_free, queued_prefill_tokens, t
H_BEAT = b"n"  # counter the writer increments on every write: a change proves liveness
H_STATE = b"state"  # b"up" or b"leaving" (graceful shutdown: routers drop the worker at once)

STATE_UP = "up"
STATE_LEAVING = "leaving"
# Each signed heartbeat field has its tag beside it (they are written separately: a leave
# writes the state alone, a beat the load only when it changed).
SIGNED_HB_FIELDS = (H_META, H_STATE, H_LOAD)
HB_SIG = {f: f + b".sig" for f in SIGNED_HB_FIELDS}


def heartbeat_signed_parts(model: str, worker: str, field: bytes, value: bytes) -> list[bytes]:
    return [b"heartbeat", model.encode(), worker.encode(), field, value]


def sign_heartbeat(fields: dict[bytes, bytes], model: str, worker: str,
                   sign: Callable[[list[bytes]], bytes]) -> dict[bytes, bytes]:
    """`fields` with the tag of each signed field added."""
    out = dict(fields)
    for f in SIGNED_HB_FIELDS:
        if f in fields:
            out[HB_SIG[f]] = sign(heartbeat_signed_parts(model, worker, f, fields[f]))
    return out


def verify_heartbeat(h: dict[bytes, bytes], model: str, worker: str,
                     verify: Verify) -> dict[bytes, bytes] | str:
    """The heartbeat hash with what failed verification removed: a bad meta or state
    rejects the whole heartbeat (returns why), a bad load drops the load alone."""
    out = dict(h)
    for f in SIGNED_HB_FIELDS:
        # meta is checked even when absent: a hash without it (only a beat counter) must not
        # make a routable worker.
        if f in h or f == H_META:
            why = verify("heartbeat", model, worker,
                         heartbeat_signed_parts(model, worker, f, h.get(f, b"")),
                         h.get(HB_SIG[f]))
            if why is not None:
                if f != H_LOAD:
                    return why
                del out[f]
    return out


@dataclass(slots=True)
class Heartbeat:
    worker: str
    beat: int
    state: str = STATE_UP
    role: str = "aggregated"
    address: str = ""
    block_size: int = 0
    epoch: str = ""
    seq: int = -1
    """Last seq the worker's publisher had written when it beat (-1: none yet)."""
    load: LoadReport | None = None
    load_t: float = 0.0
    extra: dict[str, str] | None = None


def encode_meta(meta: dict[str, Any]) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def encode_load(report: LoadReport, t: float | None = None) -> bytes:
    # KV capacity and cached blocks go after the time, so a reader that knows only the first
    # six elements still reads the rest of the report.
    packed = msgpack.packb(
        [report.running, report.queued, report.kv_used_blocks, report.kv_free_blocks,
         report.queued_prefill_tokens, time.time() if t is None else t,
         report.kv_capacity_blocks, report.kv_cached_blocks]
    )
    assert isinstance(packed, bytes)
    return packed


def _nonneg_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("expected a non-negative int")
    return v


def parse_heartbeat(worker: str, h: dict[bytes, bytes]) -> Heartbeat:
    """Raises ValueError on a heartbeat that cannot be understood."""
    try:
        beat = int(h.get(H_BEAT, b"0"))
        state = h.get(H_STATE, b"up").decode()
        meta = msgpack.unpackb(h[H_META], raw=False) if H_META in h else {}
        if not isinstance(meta, dict):
            raise ValueError("meta is not a map")
        hb = Heartbeat(worker=worker, beat=beat, state=state)
        hb.role = str(meta.get("role", "aggregated"))
        hb.address = str(meta.get("address", ""))
        hb.block_size = int(meta.get("block_size", 0))
        hb.epoch = str(meta.get("epoch", ""))
        hb.seq = int(meta.get("seq", -1))
        extra = meta.get("extra")
        if isinstance(extra, dict):
            hb.extra = {str(k): str(v) for k, v in extra.items()}
        if H_LOAD in h:
            load = msgpack.unpackb(h[H_LOAD], raw=False)
            if not isinstance(load, list) or len(load) < 6:
                raise ValueError("load is not a 6-element array")
            # Elements 7-8 (capacity, cached blocks) are optional: older writers send six.
            hb.load = LoadReport(*(_nonneg_int(x) for x in load[:5] + load[6:8]))
            hb.load_t = float(load[5])
        return hb
    except (KeyError, TypeError, UnicodeDecodeError, msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"bad heartbeat of worker {worker!r}: {exc}") from exc


# Full-dump requests --------------------------------------------------------
@dataclass(slots=True)
class DumpRequest:
    replica: str
    epoch: str
    """The epoch the router is missing data of ("" = whatever is current)."""
    reason: str
    t: float

    def encode(self) -> bytes:
        packed = msgpack.packb(
            {"replica": self.replica, "epoch": self.epoch, "reason": self.reason, "t": self.t}
        )
        assert isinstance(packed, bytes)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> DumpRequest:
        try:
            d = msgpack.unpackb(data, raw=False)
            return cls(str(d["replica"]), str(d.get("epoch", "")), str(d.get("reason", "")),
                       float(d.get("t", 0.0)))
        except Exception as exc:
            raise ValueError(f"bad dump request: {exc}") from exc
