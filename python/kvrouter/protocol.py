"""Rules the router service and every engine adapter share, each written once.

* Prompts: a request carries its token ids either as `token_ids` (repeated u32) or
  as `token_ids_le` (little-endian u32 bytes, for large prompts), never both;
  `decode_prompt` reads either form and checks the limits a caller has.
* Extra keys: what else goes into a request's block hashes besides its tokens.
  An explicit `extra_key` wins; else a LoRA adapter names the key: its name's
  utf-8 bytes, or b"lora-id:<id>" when only a numeric id is known (vLLM's
  deprecated lora_id, TensorRT-LLM's lora task id). Engine adapters tag stored
  blocks with the same bytes, so a request for adapter "x" matches blocks the
  engine stored for "x" (`extra_key_for`).
* Block sizes: the router's index splits an engine block that is exactly k
  router blocks; any other engine block size is a mismatch (`check_block_size`).
* Engine hashes: opaque u64 values that arrive signed, unsigned or as digests
  (`normalise_engine_hash`).
* Load reports: an engine's LoadReport as the Engine and Router APIs carry it
  (`load_report_pb`).
* Worker metadata: the keys a worker (or its bridge) advertises when it registers
  and the router reads to reach it (`BACKEND_METADATA_KEY`, `SERVED_MODEL_METADATA_KEY`).
* Registration limits: names (`check_name`), addresses and metadata
  (`check_worker_metadata`) are bounded so that one worker cannot make ListWorkers
  or an error message exceed the gRPC message limit; reported load values are
  clamped (`clamp_load`) and a request's expected output is capped
  (`MAX_EXPECTED_OUTPUT_TOKENS`) so that no sum the router reports overflows int64.
  Error messages quote an offending value through `excerpt` (at most 64 characters).

Every violation raises `ProtocolError` (a ValueError); the router and the engine
services answer it with INVALID_ARGUMENT, decoders re-raise their own error type.
Tier names live with the event model (kvrouter.events.model.Tier).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvrouter._proto.v1 import common_pb2

if TYPE_CHECKING:  # the event model is a layer above; only its type is needed here
    from kvrouter.events.model import LoadReport

# Worker metadata the router reads: which client reaches the worker ("grpc", the default,
# or "openai" for an OpenAI-compatible HTTP server) and the model name that server serves.
BACKEND_METADATA_KEY = "backend"
SERVED_MODEL_METADATA_KEY = "served_model"
# How the router knows the worker's cache: "exact" (the default; from its KV events) or
# "approx" (an engine that publishes no KV events: predicted from the router's decisions).
KV_MODE_METADATA_KEY = "kv_mode"
KV_MODES = ("exact", "approx")

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1

# Registration limits (docs/design.md, RegisterWorker). Names become Redis keys and
# every limit bounds what ListWorkers returns per worker.
MAX_NAME_LEN = 200  # UTF-8 bytes of a worker, model, namespace or replica name
MAX_ADDRESS_LEN = 1024  # characters of a worker's engine address
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_BYTES = 256
MAX_METADATA_VALUE_BYTES = 4096
MAX_METADATA_BYTES = 16384  # keys and values of one worker together (UTF-8)
# A request's expected output tokens above this are refused (no model emits 2^31 tokens);
# reported load values are clamped to MAX_LOAD_VALUE. Together they keep every load sum
# the router reports (ListWorkers, Explain) far inside int64.
MAX_EXPECTED_OUTPUT_TOKENS = 1 << 31
MAX_LOAD_VALUE = 1 << 40
EXCERPT_CHARS = 64


class ProtocolError(ValueError):
    """A request or engine field that breaks the shared protocol (message says how)."""


def excerpt(value: object) -> str:
    """`value` as an error message quotes it: repr of its first EXCERPT_CHARS characters,
    plus its length when cut, so that a huge value never inflates the error itself."""
    if isinstance(value, str | bytes) and len(value) > EXCERPT_CHARS:
        return f"{value[:EXCERPT_CHARS]!r}... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    return repr(value)


# --------------------------------------------------------------------------- names and registration

# No whitespace (keys hard to operate on) and no braces (they would change a Redis
# Cluster hash tag: kvrouter.events.keys). ASCII whitespace and a length in UTF-8 bytes:
# the same rule the stream-entry decoder applies to raw bytes (events/wire.py).
_NAME_RE = re.compile(r"[^\s{}]+", re.ASCII)


def check_name(kind: str, value: str) -> str:
    """Reject names that would break the Redis key layout; returns the value unchanged."""
    if (not isinstance(value, str) or not 0 < len(value.encode(errors="replace")) <= MAX_NAME_LEN
            or not _NAME_RE.fullmatch(value)):
        raise ProtocolError(f"{kind} name {excerpt(value)} is invalid: 1-{MAX_NAME_LEN} "
                            "bytes, no whitespace and no braces")
    return value


def check_address(address: str) -> str:
    if len(address) > MAX_ADDRESS_LEN:
        raise ProtocolError(f"address {excerpt(address)} is longer than {MAX_ADDRESS_LEN} characters")
    return address


def check_worker_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A worker's metadata within the registration limits, as a new dict."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise ProtocolError(f"metadata has {len(metadata)} keys, more than {MAX_METADATA_KEYS}")
    total = 0
    for k, v in metadata.items():
        kb, vb = len(k.encode()), len(v.encode())
        if not kb or kb > MAX_METADATA_KEY_BYTES:
            raise ProtocolError(f"metadata key {excerpt(k)} must be 1-{MAX_METADATA_KEY_BYTES} bytes")
        if vb > MAX_METADATA_VALUE_BYTES:
            raise ProtocolError(f"metadata value of {excerpt(k)} has {vb} bytes, more than "
                                f"{MAX_METADATA_VALUE_BYTES}")
        total += kb + vb
    if total > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata has {total} bytes, more than {MAX_METADATA_BYTES}")
    kv_mode_of(metadata)
    return dict(metadata)


def kv_mode_of(metadata: Mapping[str, str]) -> str:
    """The worker's KV mode from its metadata ("exact" when absent); ProtocolError if unknown."""
    mode = metadata.get(KV_MODE_METADATA_KEY, "exact")
    if mode not in KV_MODES:
        raise ProtocolError(f"metadata {KV_MODE_METADATA_KEY} must be one of {', '.join(KV_MODES)}, "
                            f"got {excerpt(mode)}")
    return mode


def check_expected_output_tokens(value: int) -> int:
    if not 0 <= value <= MAX_EXPECTED_OUTPUT_TOKENS:
        raise ProtocolError(f"expected_output_tokens must be in 0..{MAX_EXPECTED_OUTPUT_TOKENS}, "
                            f"got {value}")
    return value


def clamp_load(value: int) -> int:
    """A reported load value within 0..MAX_LOAD_VALUE (a report is a hint, not a request:
    an absurd one is clamped rather than refused, so the worker's heartbeat still counts)."""
    return min(max(value, 0), MAX_LOAD_VALUE)


def clamp_i64(value: int) -> int:
    """A u64 the core computed, as an int64 proto field can hold it."""
    return value if value <= I64_MAX else I64_MAX


# --------------------------------------------------------------------------- prompts


def decode_prompt(token_ids: Sequence[int], token_ids_le: bytes, *,
                  max_prompt_tokens: int | None = None,
                  vocab_size: int | None = None) -> np.ndarray:
    """The prompt as a u32 array (a zero-copy view of `token_ids_le` when that is set).

    ProtocolError when both forms or neither is set, when the bytes are not whole
    u32s, or when the prompt breaks a limit the caller passes.
    """
    if token_ids_le:
        if len(token_ids):
            raise ProtocolError("set token_ids or token_ids_le, not both")
        if len(token_ids_le) % 4:
            raise ProtocolError(f"token_ids_le has {len(token_ids_le)} bytes, not a multiple of 4")
        arr = np.frombuffer(token_ids_le, dtype="<u4")
    else:
        if not len(token_ids):
            raise ProtocolError("prompt is empty: no token ids")
        arr = np.array(token_ids, dtype=np.uint32)
    n = arr.shape[0]
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        raise ProtocolError(f"prompt has {n} tokens, more than max_prompt_tokens={max_prompt_tokens}")
    if vocab_size is not None:
        top = int(arr.max())
        if top >= vocab_size:
            raise ProtocolError(f"token id {top} at position {int(arr.argmax())} is out of range "
                                f"(vocab_size {vocab_size})")
    return arr


# --------------------------------------------------------------------------- extra keys


def lora_extra_key(lora_name: str | None, lora_id: int | None = None) -> bytes | None:
    """The extra key of a LoRA adapter (None: the base model).

    The adapter's name is what a client names in its request, so it is the key;
    the numeric id is only used when no name is known.
    """
    if lora_name:
        return lora_name.encode("utf-8")
    if lora_id is not None and lora_id != 0:
        return f"lora-id:{lora_id}".encode()
    return None


def extra_key_for(extra_key: bytes, lora_name: str = "", lora_id: int | None = None) -> bytes | None:
    """The extra key a request is hashed with: explicit `extra_key`, else its adapter's."""
    if extra_key:
        return bytes(extra_key)
    return lora_extra_key(lora_name, lora_id)


# --------------------------------------------------------------------------- block sizes


def check_block_size(engine_block_size: int, router_block_size: int) -> str | None:
    """None when the router can index this engine's blocks, else why it cannot.

    The router's index splits an engine block that is exactly k router blocks
    (PrefixIndex.apply_stored(engine_block_size=...)). It cannot merge smaller
    engine blocks or split blocks that are not a whole multiple of its own.
    """
    if engine_block_size <= 0:
        return f"engine block size {engine_block_size} is not positive"
    if router_block_size <= 0:
        return f"router block size {router_block_size} is not positive"
    if engine_block_size % router_block_size == 0:
        return None
    if engine_block_size < router_block_size:
        return (
            f"engine block size {engine_block_size} is smaller than the router block size "
            f"{router_block_size}; engine blocks cannot be merged: configure the model's "
            f"router block size to a divisor of {engine_block_size}"
        )
    return (
        f"engine block size {engine_block_size} is not a multiple of the router block size "
        f"{router_block_size}: configure the model's router block size to a divisor of "
        f"{engine_block_size}"
    )


# --------------------------------------------------------------------------- engine hashes


def normalise_engine_hash(value: object, what: str = "engine hash",
                          error: type[ValueError] = ProtocolError) -> int:
    """An engine's block hash as u64: accepts signed i64, u64 and 1..32-byte digests.

    A digest is reduced to its low 64 bits, read big-endian as the engines that emit
    them do. Anything else raises `error` (a decoder passes its own error type).
    """
    if isinstance(value, bytes | bytearray):
        if len(value) == 0 or len(value) > 32:
            raise error(f"{what}: engine hash of {len(value)} bytes (expected 1..32)")
        return int.from_bytes(bytes(value)[-8:], "big")
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{what} must be an integer or bytes, got {type(value).__name__}")
    if -(1 << 63) <= value < 0:
        return value & U64_MAX
    if 0 <= value <= U64_MAX:
        return value
    raise error(f"{what}: engine hash {value} outside the signed or unsigned 64-bit range")


# --------------------------------------------------------------------------- load reports


def load_report_pb(load: LoadReport) -> common_pb2.LoadReport:
    """An engine's load report as common.v1 LoadReport (Heartbeat, Engine.Stats)."""
    return common_pb2.LoadReport(
        running=load.running, queued=load.queued, kv_used_blocks=load.kv_used_blocks,
        kv_free_blocks=load.kv_free_blocks, queued_prefill_tokens=load.queued_prefill_tokens,
        kv_capacity_blocks=load.kv_capacity_blocks, kv_cached_blocks=load.kv_cached_blocks)
