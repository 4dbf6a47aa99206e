"""SGLang's ZMQ KV events: vLLM's wire family, decoded by the vLLM decoder.

What differs from vLLM (everything else, including the replay protocol, is
kvrouter.engines.vllm.wire):

* Events are tagged ARRAYS: ["BlockStored", block_hashes, parent_block_hash,
  token_ids, block_size, lora_id(, medium ...)], ["BlockRemoved", block_hashes],
  ["AllBlocksCleared"]; no kv cache groups.
* The batch is [ts, events] without a data-parallel rank: with attention DP each
  rank runs its own publisher on its own port, endpoint port + rank (ipc/inproc
  endpoints get a "_dp<rank>" suffix). The bridge knows the rank from the
  endpoint it subscribed to and passes it to `SglangDecoder`.
* The default topic is "" (an empty topic frame).
* block_size is SGLang's page size, which defaults to 1. The router cannot merge
  engine blocks, so SGLang must run with --page-size a multiple of the router's
  block size; kvrouter.protocol.check_block_size names the mismatch otherwise.
* Hashes may be Python hash() values (signed i64); they are normalised to u64.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrouter.engines.vllm.wire import (
    DecodedBatch,
    ReplayItem,
    VllmDecoder,
    parse_replay_reply,
    replay_request,
)

__all__ = [
    "DEFAULT_TOPIC",
    "SglangDecoder",
    "endpoint_for_dp_rank",
    "parse_replay_reply",
    "replay_request",
]

DEFAULT_TOPIC = b""


def endpoint_for_dp_rank(endpoint: str, dp_rank: int) -> str:
    """The endpoint SGLang's publisher for attention-DP rank `dp_rank` uses."""
    if dp_rank < 0:
        raise ValueError(f"dp rank must be >= 0, got {dp_rank}")
    if dp_rank == 0:
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{dp_rank}"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit() or host == "tcp":
            raise ValueError(f"tcp endpoint {endpoint!r} has no port")
        return f"{host}:{int(port) + dp_rank}"
    raise ValueError(f"unsupported endpoint {endpoint!r} (expected tcp://, ipc:// or inproc://)")


class SglangDecoder(VllmDecoder):
    """A vLLM decoder bound to one SGLang publisher (one attention-DP rank)."""

    def __init__(self, dp_rank: int = 0) -> None:
        super().__init__(group_idx=None)
        if dp_rank < 0:
            raise ValueError(f"dp rank must be >= 0, got {dp_rank}")
        self.dp_rank = dp_rank

    def decode_message(self, frames: Sequence[bytes], default_dp_rank: int | None = None
                       ) -> DecodedBatch:
        rank = self.dp_rank if default_dp_rank is None else default_dp_rank
        return super().decode_message(frames, default_dp_rank=rank)

    def decode_replay(self, item: ReplayItem, default_dp_rank: int | None = None) -> DecodedBatch:
        rank = self.dp_rank if default_dp_rank is None else default_dp_rank
        return super().decode_replay(item, default_dp_rank=rank)
