"""vLLM's ZMQ KV-event wire format, decoded into kvrouter's event model.

vLLM (and SGLang, same family: see kvrouter.engines.sglang.wire) publishes KV
cache events on a ZMQ PUB socket and keeps a replay buffer behind a ROUTER socket.

PUB message (three frames)::

    topic            utf-8 bytes (b"" when the topic is empty)
    seq              8 bytes, big-endian unsigned; 0 for the first batch of an
                     engine process, +1 per batch
    payload          msgpack array [ts: float, events: array, dp_rank: int]
                     (dp_rank omitted by older engines and by SGLang)

Events come in two layouts; both are accepted:

* maps (vLLM >= 0.11-ish): {"type": "BlockStored", <field>: <value>, ...}; fields
  equal to their declared default are omitted;
* tagged arrays (older vLLM, SGLang): ["BlockStored", <fields in declared order>];
  trailing fields equal to their default are omitted.

Declared field order (what the positional layout follows)::

    BlockStored      block_hashes, parent_block_hash, token_ids, block_size, lora_id,
                     medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
                     kv_cache_spec_sliding_window, locality, ownership, session_id
    BlockRemoved     block_hashes, medium, group_idx, locality, ownership
    AllBlocksCleared (no fields)

Translation rules (each one is a contract with the router):

* Hashes: u64 after kvrouter.protocol.normalise_engine_hash (signed i64, u64
  >= 2**63 and 32-byte digests all arrive in the wild).
* medium -> Tier (kvrouter.events.model.Tier.parse): "GPU"/device names -> gpu,
  "CPU"/host memory -> host, "STORAGE"/"DISK"/SSD-like names -> disk; absent ->
  gpu; anything else is a WireError (silently guessing a tier would mis-score hits).
* extra_key of BlockStored: kvrouter.protocol.lora_extra_key, the rule the router
  also applies to a request's lora_name: lora_name's utf-8 bytes when set, else
  b"lora-id:<lora_id>" when only the (deprecated) numeric id is set, else None.
* Per-block extra_keys: vLLM lists what else went into each block's hash (LoRA
  name, multimodal content hashes, cache salt, prompt-embedding hashes). Entries
  that only repeat lora_name are covered by extra_key. Anything else cannot be
  represented by a per-request key folded into the first block, so such a
  BlockStored is dropped and counted as "unrepresentable_extra_keys" (indexing it
  by tokens alone would claim a hit for a request with the same tokens but
  different images). Its descendants then arrive with an unknown parent, which
  the index reports as orphans.
* Hybrid models: only full-attention KV cache groups are indexed, and only one
  group (the configured `group_idx`, else the first full-attention group seen):
  every group stores the same hashes, so a sliding-window group's evictions would
  otherwise erase blocks the full-attention group still holds.
* Block size: BlockStored keeps the engine's block_size; the router's index
  splits engine blocks that are a multiple of its own (see
  kvrouter.protocol.check_block_size, which names every other case).

Malformed frames raise WireError (a ValueError) with a message saying what is
wrong; the caller counts and drops them. Unknown event types and filtered events
are not errors: they are dropped and counted in DecodedBatch.dropped.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, Tier
from kvrouter.protocol import U32_MAX, lora_extra_key, normalise_engine_hash

log = logging.getLogger(__name__)

SEQ_LEN = 8
END_OF_REPLAY = b"\xff" * SEQ_LEN
"""Sequence frame of the replay end marker (-1 as a signed 64-bit integer)."""

STORED_FIELDS: tuple[str, ...] = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
)
REMOVED_FIELDS: tuple[str, ...] = ("block_hashes", "medium", "group_idx", "locality", "ownership")
_REQUIRED_STORED = 4  # block_hashes, parent_block_hash, token_ids, block_size
_REQUIRED_REMOVED = 1

FULL_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
"""kv_cache_spec_kind values whose blocks hold the whole prefix (indexable)."""



class WireError(ValueError):
    """A frame or payload that does not follow the documented layout."""


class DropReason(StrEnum):
    """Why a well-formed engine event was not translated (counted, never an error)."""

    UNKNOWN_TYPE = "unknown_event_type"
    EMPTY = "empty_event"
    EXTRA_KEYS = "unrepresentable_extra_keys"
    NOT_FULL_ATTENTION = "not_full_attention"
    OTHER_GROUP = "other_kv_cache_group"


@dataclass(slots=True)
class DecodedBatch:
    """One published (or replayed) engine batch, translated."""

    topic: bytes
    seq: int
    ts: float
    dp_rank: int | None
    events: list[KvEvent] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One replayed batch: [b"", topic, seq, payload] from the replay ROUTER."""

    topic: bytes
    seq: int
    payload: bytes


def medium_to_tier(medium: object) -> Tier:
    """Engine storage medium name -> router tier (None means the GPU)."""
    if medium is None:
        return Tier.GPU
    if not isinstance(medium, str):
        raise WireError(f"medium must be a string or nil, got {type(medium).__name__}")
    try:
        return Tier.parse(medium)
    except ValueError as exc:
        raise WireError(f"unknown storage medium {medium!r} (expected GPU, CPU or a disk tier)"
                        ) from exc


# --------------------------------------------------------------------------- frames


def encode_seq(seq: int) -> bytes:
    if not 0 <= seq < 1 << 64:
        raise ValueError(f"sequence {seq} outside 0..2**64-1")
    return seq.to_bytes(SEQ_LEN, "big")


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_LEN:
        raise WireError(f"sequence frame has {len(frame)} bytes (expected {SEQ_LEN})")
    return int.from_bytes(frame, "big")


def replay_request(start_seq: int) -> list[bytes]:
    """Frames a DEALER sends to the replay ROUTER to get every buffered batch >= start_seq.

    A REQ socket would add the empty delimiter itself but then accepts only the
    first of the many replies, so the bridge uses a DEALER and adds it here.
    """
    return [b"", encode_seq(start_seq)]


def parse_replay_reply(frames: Sequence[bytes]) -> ReplayItem | None:
    """One reply received on the DEALER; None for the end marker [b"", b"", ff*8, b""]."""
    if len(frames) != 4:
        raise WireError(f"replay reply has {len(frames)} frames (expected 4)")
    delimiter, topic, seq_frame, payload = (bytes(f) for f in frames)
    if delimiter:
        raise WireError("replay reply does not start with the empty delimiter frame")
    if seq_frame == END_OF_REPLAY:
        return None
    return ReplayItem(topic=topic, seq=decode_seq(seq_frame), payload=payload)


# --------------------------------------------------------------------------- events


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"payload is not valid msgpack: {exc}") from exc


def _hash(value: object, what: str) -> int:
    return normalise_engine_hash(value, what, WireError)


def _hashes(value: object, what: str = "block_hashes") -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise WireError(f"{what} must be an array, got {type(value).__name__}")
    return tuple(_hash(v, what) for v in value)


def _opt_int(fields: Mapping[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{name} must be an integer or nil, got {type(value).__name__}")
    return value


def _opt_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string or nil, got {type(value).__name__}")
    return value


def _event_fields(raw: object) -> tuple[str, dict[str, Any]]:
    """(type name, fields by name) of one event in either layout."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise WireError("event map has no string 'type' key")
        if not all(isinstance(k, str) for k in raw):
            raise WireError(f"{kind} event map has non-string keys")
        return kind, {k: v for k, v in raw.items() if k != "type"}
    if isinstance(raw, list | tuple):
        if not raw or not isinstance(raw[0], str):
            raise WireError("event array does not start with its type tag")
        kind, values = raw[0], raw[1:]
        if kind == "BlockStored":
            names, required = STORED_FIELDS, _REQUIRED_STORED
        elif kind == "BlockRemoved":
            names, required = REMOVED_FIELDS, _REQUIRED_REMOVED
        else:
            names, required = (), 0
        if len(values) < required:
            raise WireError(
                f"{kind} array has {len(values)} fields (at least {required} required)"
            )
        # Fields past the ones we know are newer additions: ignored like unknown map keys.
        return kind, dict(zip(names, values, strict=False))
    raise WireError(f"event must be a map or an array, got {type(raw).__name__}")


class VllmDecoder:
    """Decodes one publisher's messages (one decoder per ZMQ subscription).

    Stateful only in which KV cache group it indexes (see module docstring) and in
    its running counters; safe to reuse across engine restarts.
    """

    def __init__(self, group_idx: int | None = None) -> None:
        self._configured_group = group_idx
        self._group: int | None = group_idx
        self.dropped: Counter[str] = Counter()
        self.malformed = 0

    @property
    def group_idx(self) -> int | None:
        """The KV cache group being indexed (None until the first full-attention store)."""
        return self._group

    # -- messages ----------------------------------------------------------------

    def decode_message(self, frames: Sequence[bytes], default_dp_rank: int | None = None
                       ) -> DecodedBatch:
        """Decode a PUB multipart message [topic, seq, payload]."""
        if len(frames) != 3:
            self.malformed += 1
            raise WireError(f"message has {len(frames)} frames (expected topic, seq, payload)")
        topic, seq_frame, payload = (bytes(f) for f in frames)
        try:
            seq = decode_seq(seq_frame)
        except WireError:
            self.malformed += 1
            raise
        return self.decode_payload(payload, topic=topic, seq=seq, default_dp_rank=default_dp_rank)

    def decode_replay(self, item: ReplayItem, default_dp_rank: int | None = None) -> DecodedBatch:
        return self.decode_payload(item.payload, topic=item.topic, seq=item.seq,
                                   default_dp_rank=default_dp_rank)

    def decode_payload(self, payload: bytes, topic: bytes = b"", seq: int = 0,
                       default_dp_rank: int | None = None) -> DecodedBatch:
        """Decode one batch payload; all or nothing (WireError leaves no trace but a count)."""
        try:
            batch = self._decode_payload(payload, topic, seq, default_dp_rank)
        except WireError:
            self.malformed += 1
            raise
        self.dropped.update(batch.dropped)
        return batch

    def _decode_payload(self, payload: bytes, topic: bytes, seq: int,
                        default_dp_rank: int | None) -> DecodedBatch:
        top = _unpack(payload)
        if not isinstance(top, list) or not 2 <= len(top) <= 3:
            raise WireError("batch must be an array [ts, events] or [ts, events, dp_rank]")
        ts, raw_events = top[0], top[1]
        if isinstance(ts, bool) or not isinstance(ts, float | int) or not math.isfinite(ts):
            raise WireError(f"batch timestamp must be a finite number, got {ts!r}")
        if not isinstance(raw_events, list):
            raise WireError(f"batch events must be an array, got {type(raw_events).__name__}")
        dp_rank = top[2] if len(top) == 3 else default_dp_rank
        if dp_rank is not None and (not isinstance(dp_rank, int) or isinstance(dp_rank, bool)
                                    or dp_rank < 0):
            raise WireError(f"data parallel rank must be a non-negative integer, got {dp_rank!r}")
        out = DecodedBatch(topic=topic, seq=seq, ts=float(ts), dp_rank=dp_rank)
        group = self._group
        for raw in raw_events:
            event, reason, group = self._translate(raw, group)
            if event is not None:
                out.events.append(event)
            elif reason is not None:
                out.dropped[reason.value] += 1
        # Commit the group choice only once the whole batch decoded.
        if self._group is None and group is not None:
            log.debug("vllm kv group selected group_idx=%d", group)
        self._group = group
        return out

    # -- one event ---------------------------------------------------------------

    def _translate(self, raw: object, group: int | None
                   ) -> tuple[KvEvent | None, DropReason | None, int | None]:
        kind, fields = _event_fields(raw)
        if kind == "AllBlocksCleared":
            return AllCleared(), None, group
        if kind == "BlockRemoved":
            if "block_hashes" not in fields:
                raise WireError("BlockRemoved has no block_hashes")
            hashes = _hashes(fields["block_hashes"])
            tier = medium_to_tier(fields.get("medium"))
            event_group = _opt_int(fields, "group_idx") or 0
            if group is not None and event_group != group:
                return None, DropReason.OTHER_GROUP, group
            if not hashes:
                return None, DropReason.EMPTY, group
            return BlockRemoved(hashes=hashes, tier=tier), None, group
        if kind == "BlockStored":
            return self._stored(fields, group)
        return None, DropReason.UNKNOWN_TYPE, group

    def _stored(self, fields: Mapping[str, Any], group: int | None
                ) -> tuple[KvEvent | None, DropReason | None, int | None]:
        for name in STORED_FIELDS[:_REQUIRED_STORED]:
            if name not in fields and name != "parent_block_hash":
                raise WireError(f"BlockStored has no {name}")
        hashes = _hashes(fields["block_hashes"])
        parent_raw = fields.get("parent_block_hash")
        parent = None if parent_raw is None else _hash(parent_raw, "parent_block_hash")
        tokens = fields["token_ids"]
        if not isinstance(tokens, list | tuple):
            raise WireError(f"token_ids must be an array, got {type(tokens).__name__}")
        # type() is int: excludes bool, which isinstance would accept.
        if not all(type(t) is int for t in tokens) or (
            tokens and (min(tokens) < 0 or max(tokens) > U32_MAX)
        ):
            bad = next(t for t in tokens if type(t) is not int or not 0 <= t <= U32_MAX)
            raise WireError(f"token id {bad!r} is not an unsigned 32-bit integer")
        block_size = fields["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise WireError(f"block_size must be a positive integer, got {block_size!r}")
        if len(tokens) != block_size * len(hashes):
            raise WireError(
                f"BlockStored has {len(tokens)} token ids for {len(hashes)} blocks of {block_size}"
            )
        tier = medium_to_tier(fields.get("medium"))
        lora_name = _opt_str(fields, "lora_name")
        lora_id = _opt_int(fields, "lora_id")
        extra_keys = fields.get("extra_keys")
        if extra_keys is not None:
            if not isinstance(extra_keys, list | tuple) or len(extra_keys) != len(hashes):
                raise WireError("extra_keys must be an array with one entry per block")
        event_group = _opt_int(fields, "group_idx") or 0
        spec_kind = _opt_str(fields, "kv_cache_spec_kind")

        # Filters: order matters only for which reason is counted.
        if spec_kind is not None and spec_kind not in FULL_ATTENTION_KINDS:
            return None, DropReason.NOT_FULL_ATTENTION, group
        if group is None:
            group = event_group  # first full-attention group seen becomes the indexed one
        elif event_group != group:
            return None, DropReason.OTHER_GROUP, group
        if not hashes:
            return None, DropReason.EMPTY, group
        if extra_keys is not None and not _extra_keys_covered(extra_keys, lora_name):
            return None, DropReason.EXTRA_KEYS, group
        return (
            BlockStored(
                hashes=hashes,
                parent=parent,
                token_ids=tuple(tokens),
                block_size=block_size,
                tier=tier,
                extra_key=lora_extra_key(lora_name, lora_id),
            ),
            None,
            group,
        )


def _extra_keys_covered(extra_keys: Sequence[object], lora_name: str | None) -> bool:
    """True when every block's extra keys are nil or only repeat the LoRA name."""
    for entry in extra_keys:
        if entry is None:
            continue
        if not isinstance(entry, list | tuple):
            raise WireError(f"extra_keys entry must be an array or nil, got {type(entry).__name__}")
        if any(item != lora_name or lora_name is None for item in entry):
            return False
    return True


def decode_message(frames: Sequence[bytes]) -> DecodedBatch:
    """Stateless convenience: decode one PUB message with a fresh decoder."""
    return VllmDecoder().decode_message(frames)


# --------------------------------------------------------------------------- sequences


class SeqStatus(StrEnum):
    FIRST = "first"  # first batch seen from this publisher
    NEXT = "next"  # exactly the expected sequence number
    GAP = "gap"  # batches first_missing .. seq-1 were lost: replay them, then apply this one
    RESTART = "restart"  # a new engine process: start a new epoch
    DUPLICATE = "duplicate"  # already applied (overlap of replay and live stream): skip


@dataclass(frozen=True, slots=True)
class SeqObservation:
    status: SeqStatus
    seq: int
    first_missing: int | None = None
    """First sequence number to ask the replay socket for (GAP, and FIRST/RESTART
    when the stream was joined after its start)."""
    missing: int = 0

    @property
    def apply(self) -> bool:
        """Whether the batch may be applied now (in order, nothing missing before it)."""
        return self.status in (SeqStatus.NEXT, SeqStatus.FIRST, SeqStatus.RESTART) and (
            self.first_missing is None
        )


class SeqTracker:
    """Per-publisher sequence bookkeeping for the vLLM / SGLang bridges.

    The tracker only advances over batches it says may be applied, so a GAP
    keeps being reported (with the same first_missing) until the bridge feeds it
    the missing batches (from the replay socket, which replays everything >= the
    requested seq, the gap batch included) or gives up with `resync`.

    Restarts: a new engine process restarts at 0, so seq == 0 after any batch is
    a restart. A process that restarted while the bridge was disconnected may be
    first seen at seq > 0: it then looks like duplicates; after `stale_limit`
    consecutive duplicates the tracker declares a restart with first_missing=0.
    """

    def __init__(self, stale_limit: int = 256) -> None:
        if stale_limit < 1:
            raise ValueError("stale_limit must be >= 1")
        self._last: dict[str, int] = {}
        self._stale: dict[str, int] = {}
        self.stale_limit = stale_limit

    def last(self, publisher: str) -> int | None:
        """Highest sequence number applied from this publisher."""
        return self._last.get(publisher)

    def observe(self, publisher: str, seq: int) -> SeqObservation:
        if not 0 <= seq < 1 << 64:
            raise ValueError(f"sequence {seq} outside 0..2**64-1")
        last = self._last.get(publisher)
        if last is None:
            if seq == 0:
                self._advance(publisher, seq)
                return SeqObservation(SeqStatus.FIRST, seq)
            # Joined late: the batches before this one may still be in the replay buffer.
            return SeqObservation(SeqStatus.FIRST, seq, first_missing=0, missing=seq)
        if seq == last + 1:
            self._advance(publisher, seq)
            return SeqObservation(SeqStatus.NEXT, seq)
        if seq > last + 1:
            self._stale[publisher] = 0
            return SeqObservation(SeqStatus.GAP, seq, first_missing=last + 1,
                                  missing=seq - last - 1)
        if seq == 0:
            self._advance(publisher, seq)
            return SeqObservation(SeqStatus.RESTART, seq)
        stale = self._stale.get(publisher, 0) + 1
        self._stale[publisher] = stale
        if stale >= self.stale_limit:
            self.forget(publisher)
            return SeqObservation(SeqStatus.RESTART, seq, first_missing=0, missing=seq)
        return SeqObservation(SeqStatus.DUPLICATE, seq)

    def resync(self, publisher: str, seq: int) -> None:
        """Accept `seq` as applied without its predecessors (replay impossible: the
        bridge resynchronises the worker another way, e.g. a new epoch)."""
        self._advance(publisher, seq)

    def forget(self, publisher: str) -> None:
        self._last.pop(publisher, None)
        self._stale.pop(publisher, None)

    def _advance(self, publisher: str, seq: int) -> None:
        self._last[publisher] = seq
        self._stale[publisher] = 0
