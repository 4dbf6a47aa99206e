"""Wire payload of one Redis stream entry (docs/design.md §3.2): msgpack, compact.

    payload = [event, ...]
    stored  = {"type": "stored", "hashes": [u64...], "parent": u64 | nil,
               "tokens": bin (little-endian u32 ids, block_size per hash) | nil,
               "block_size": int, "router_hashes": [u64...] | nil,
               "tier": "gpu" | "host" | "disk", "extra_key": bin | nil}
    removed = {"type": "removed", "hashes": [u64...], "tier": "gpu" | "host" | "disk"}
    cleared = {"type": "cleared"}

Unknown keys are ignored and absent optional keys take their defaults, so the
format can grow. The encoder lives here; the decoder lives in Rust
(`kvrouter._core.decode_payload`, also used by `PrefixIndex.apply_payload`)
because decoding is the ingest hot path.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import msgpack

from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, Tier


def _tokens_bytes(tokens: tuple[int, ...]) -> bytes:
    arr = array("I", tokens)
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit here")
    if array("I", [1]).tobytes() != b"\x01\x00\x00\x00":  # big-endian host
        arr.byteswap()
    return arr.tobytes()


def event_to_wire(event: KvEvent) -> dict[str, object]:
    if isinstance(event, BlockStored):
        return {
            "type": "stored",
            "hashes": list(event.hashes),
            "parent": event.parent,
            "tokens": None if event.token_ids is None else _tokens_bytes(event.token_ids),
            "block_size": event.block_size,
            "router_hashes": None if event.router_hashes is None else list(event.router_hashes),
            "tier": Tier(event.tier).wire,
            "extra_key": event.extra_key,
        }
    if isinstance(event, BlockRemoved):
        return {"type": "removed", "hashes": list(event.hashes), "tier": Tier(event.tier).wire}
    if isinstance(event, AllCleared):
        return {"type": "cleared"}
    raise TypeError(f"not a kv event: {type(event).__name__}")


def encode_payload(events: Iterable[KvEvent]) -> bytes:
    packed = msgpack.packb([event_to_wire(e) for e in events], use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed
