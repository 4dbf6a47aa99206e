"""SGLang KV events: tagged arrays, no dp rank in the batch, signed hashes, per-rank ports.
Payloads are hand-built with msgpack following SGLang's documented layout."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from kvrouter.engines.sglang.wire import (
    DEFAULT_TOPIC,
    SglangDecoder,
    endpoint_for_dp_rank,
    parse_replay_reply,
    replay_request,
)
from kvrouter.engines.vllm.wire import END_OF_REPLAY, WireError
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, Tier
from kvrouter.protocol import check_block_size


def _message(events: list[Any], seq: int = 0) -> list[bytes]:
    # EventBatch is [ts, events]: SGLang does not put the rank in the batch.
    return [DEFAULT_TOPIC, seq.to_bytes(8, "big"), msgpack.packb([12.5, events])]


def test_sglang_arrays_with_signed_hashes_and_rank_from_the_endpoint() -> None:
    tokens = list(range(1, 33))
    events = [
        ["BlockStored", [-2, 9], None, tokens, 16, None],
        ["BlockStored", [-(1 << 63)], -2, tokens[:16], 16, 4],
        ["BlockStored", [11], 9, tokens[:16], 16, None, "CPU"],  # newer: with medium
        ["BlockRemoved", [-2, 9]],
        ["AllBlocksCleared"],
    ]
    batch = SglangDecoder(dp_rank=3).decode_message(_message(events, seq=41))
    assert batch.dp_rank == 3 and batch.seq == 41 and batch.topic == b""
    assert batch.events == [
        BlockStored(hashes=((1 << 64) - 2, 9), parent=None, token_ids=tuple(tokens),
                    block_size=16),
        BlockStored(hashes=(1 << 63,), parent=(1 << 64) - 2, token_ids=tuple(tokens[:16]),
                    block_size=16, extra_key=b"lora-id:4"),
        BlockStored(hashes=(11,), parent=9, token_ids=tuple(tokens[:16]), block_size=16,
                    tier=Tier.HOST),
        BlockRemoved(hashes=((1 << 64) - 2, 9)),
        AllCleared(),
    ]
    # A rank carried in the batch (vLLM style) wins over the decoder's default.
    frames = [b"", b"\0" * 8, msgpack.packb([1.0, [["AllBlocksCleared"]], 5])]
    assert SglangDecoder(dp_rank=3).decode_message(frames).dp_rank == 5


def test_sglang_page_size_one_is_a_block_size_mismatch() -> None:
    events = [["BlockStored", [1, 2, 3], None, [7, 8, 9], 1, None]]
    batch = SglangDecoder().decode_message(_message(events))
    stored = batch.events[0]
    assert isinstance(stored, BlockStored) and stored.block_size == 1
    reason = check_block_size(stored.block_size, 16)
    assert reason is not None and "smaller than the router block size 16" in reason
    assert check_block_size(64, 16) is None


def test_sglang_malformed_batch() -> None:
    decoder = SglangDecoder()
    with pytest.raises(WireError, match="at least 4"):
        decoder.decode_message(_message([["BlockStored", [1], None]]))
    with pytest.raises(WireError, match="2 token ids for 1 blocks of 1"):
        decoder.decode_message(_message([["BlockStored", [1], None, [1, 2], 1]]))
    assert decoder.malformed == 2
    with pytest.raises(ValueError):
        SglangDecoder(dp_rank=-1)


def test_sglang_replay_shares_the_vllm_protocol() -> None:
    decoder = SglangDecoder(dp_rank=1)
    assert replay_request(3) == [b"", (3).to_bytes(8, "big")]
    payload = msgpack.packb([2.0, [["BlockRemoved", [5]]]])
    item = parse_replay_reply([b"", b"", (3).to_bytes(8, "big"), payload])
    assert item is not None
    batch = decoder.decode_replay(item)
    assert batch.seq == 3 and batch.dp_rank == 1 and batch.events == [BlockRemoved(hashes=(5,))]
    assert parse_replay_reply([b"", b"", END_OF_REPLAY, b""]) is None


def test_endpoint_for_dp_rank() -> None:
    assert endpoint_for_dp_rank("tcp://*:5557", 0) == "tcp://*:5557"
    assert endpoint_for_dp_rank("tcp://*:5557", 2) == "tcp://*:5559"
    assert endpoint_for_dp_rank("tcp://10.0.0.1:6000", 1) == "tcp://10.0.0.1:6001"
    assert endpoint_for_dp_rank("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"
    assert endpoint_for_dp_rank("inproc://kv", 4) == "inproc://kv_dp4"
    with pytest.raises(ValueError, match="no port"):
        endpoint_for_dp_rank("tcp://host", 1)
    with pytest.raises(ValueError, match="unsupported"):
        endpoint_for_dp_rank("udp://host:1", 1)
    with pytest.raises(ValueError):
        endpoint_for_dp_rank("tcp://*:5557", -1)
