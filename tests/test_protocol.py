"""kvrouter.protocol: the rules the router service and the engine adapters share."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kvrouter._core import hash_blocks
from kvrouter.protocol import (
    U64_MAX,
    ProtocolError,
    check_block_size,
    decode_prompt,
    extra_key_for,
    load_report_pb,
    lora_extra_key,
    normalise_engine_hash,
)


def le(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def test_both_prompt_forms_decode_to_the_same_u32_array() -> None:
    tokens = [0, 1, 31999, 2**32 - 1]
    a = decode_prompt(tokens, b"")
    b = decode_prompt([], le(tokens))
    assert a.dtype == b.dtype == np.uint32
    assert a.tolist() == b.tolist() == tokens


@pytest.mark.parametrize(("ids", "raw", "match"), [
    ([], b"", "empty"),
    ([1], le([1]), "not both"),
    ([], b"\x01\x00\x00", "multiple of 4"),
])
def test_malformed_prompts_are_protocol_errors(ids: list[int], raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_prompt(ids, raw)


def test_prompt_limits() -> None:
    assert decode_prompt([1, 2, 3], b"", max_prompt_tokens=3, vocab_size=4).tolist() == [1, 2, 3]
    with pytest.raises(ProtocolError, match="max_prompt_tokens=2"):
        decode_prompt([], le([1, 2, 3]), max_prompt_tokens=2)
    with pytest.raises(ProtocolError, match=r"token id 9 at position 1 .*vocab_size 9"):
        decode_prompt([1, 9, 2], b"", vocab_size=9)
    assert issubclass(ProtocolError, ValueError)  # callers map ValueError to INVALID_ARGUMENT


def test_extra_key_rule() -> None:
    assert extra_key_for(b"", "") is None
    assert extra_key_for(b"salt", "adapter") == b"salt"  # explicit key wins
    assert extra_key_for(b"", "adapter") == b"adapter" == lora_extra_key("adapter")
    assert extra_key_for(b"", "", 7) == b"lora-id:7"
    assert lora_extra_key(None, 0) is None
    assert lora_extra_key("tuned-ü", 9) == "tuned-ü".encode()


def test_a_lora_request_hashes_like_the_engines_adapter_blocks() -> None:
    """What an engine adapter tags a block with (vLLM lora_name) is what a request with
    only lora_name is hashed with, so the two meet in the index."""
    tokens = list(range(32))
    engine_side = hash_blocks(tokens, 16, lora_extra_key("ad", None))
    request_side = hash_blocks(tokens, 16, extra_key_for(b"", "ad"))
    assert list(engine_side) == list(request_side)
    assert list(hash_blocks(tokens, 16, None)) != list(engine_side)


def test_block_size_rule() -> None:
    assert check_block_size(32, 16) is None and check_block_size(16, 16) is None
    assert "not a multiple" in (check_block_size(48, 32) or "")
    assert "smaller than the router block size 16" in (check_block_size(1, 16) or "")
    assert "not positive" in (check_block_size(0, 16) or "")
    assert "not positive" in (check_block_size(16, 0) or "")


def test_engine_hash_normalisation() -> None:
    assert normalise_engine_hash(5) == 5
    assert normalise_engine_hash(-1) == U64_MAX
    assert normalise_engine_hash(U64_MAX) == U64_MAX
    assert normalise_engine_hash(b"\x00" * 24 + (7).to_bytes(8, "big")) == 7
    for bad in (True, 1.5, None, b"", b"\x00" * 33, 1 << 64, -(1 << 63) - 1):
        with pytest.raises(ProtocolError):
            normalise_engine_hash(bad)

    class DecoderError(ValueError):
        pass

    with pytest.raises(DecoderError, match="parent_hash must be an integer or bytes"):
        normalise_engine_hash("x", "parent_hash", DecoderError)


def test_load_report_carries_every_field() -> None:
    from kvrouter.events.model import LoadReport

    ld = LoadReport(running=1, queued=2, kv_used_blocks=3, kv_free_blocks=4, queued_prefill_tokens=5)
    pb = load_report_pb(ld)
    assert (pb.running, pb.queued, pb.kv_used_blocks, pb.kv_free_blocks,
            pb.queued_prefill_tokens) == (1, 2, 3, 4, 5)
