"""Block hashing: golden vectors, an independent xxh3 check of the spec, input types."""

from __future__ import annotations

import json
import struct
from array import array
from pathlib import Path

import numpy as np
import pytest
import xxhash

import kvrouter
from kvrouter import HASH_SEED, hash_blocks, local_block_hash

GOLDEN = json.loads((Path(__file__).parent / "golden" / "hash_vectors.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_golden_vectors(case: dict) -> None:
    got = hash_blocks(case["tokens"], case["block_size"], case["extra_key"])
    assert got == [int(h) for h in case["hashes"]]


def spec_hash_blocks(tokens: list[int], block_size: int, extra_key: bytes | None = None) -> list[int]:
    """docs/design.md §3.1 written out with the reference xxhash package."""
    parent = 0
    if extra_key:
        parent = xxhash.xxh3_64_intdigest(extra_key, seed=HASH_SEED ^ 0x6578_7472_616B_6579)
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        local = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *block), seed=HASH_SEED)
        parent = xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), seed=HASH_SEED)
        out.append(parent)
    return out


def test_matches_the_written_spec() -> None:
    rng = np.random.default_rng(3)
    for bs in (1, 4, 16, 32, 64, 512):
        toks = rng.integers(0, 2**32, size=bs * 5 + 3, dtype=np.uint64).tolist()
        assert hash_blocks(toks, bs) == spec_hash_blocks(toks, bs)
        assert hash_blocks(toks, bs, b"lora-x") == spec_hash_blocks(toks, bs, b"lora-x")
    assert local_block_hash([1, 2, 3]) == xxhash.xxh3_64_intdigest(struct.pack("<3I", 1, 2, 3), seed=HASH_SEED)


def test_all_input_forms_agree() -> None:
    toks = list(range(100, 164))
    expected = hash_blocks(toks, 16)
    le = struct.pack("<64I", *toks)
    forms = [
        tuple(toks),
        array("I", toks),
        np.array(toks, dtype=np.uint32),
        np.array(toks, dtype=np.int64),
        np.array(toks, dtype=np.int32),
        np.array(toks, dtype=np.uint64),
        le,
        bytearray(le),
        memoryview(le),
        iter(toks),
    ]
    for f in forms:
        assert hash_blocks(f, 16) == expected, type(f)
    # Strided numpy views are read in logical order.
    wide = np.array([toks, toks]).T.copy()[:, 0]
    assert hash_blocks(wide, 16) == expected


def test_extra_key_str_and_bytes_are_the_same_and_differ_from_plain() -> None:
    toks = list(range(32))
    assert hash_blocks(toks, 8, "salt") == hash_blocks(toks, 8, b"salt")
    assert set(hash_blocks(toks, 8, "salt")).isdisjoint(hash_blocks(toks, 8))


@pytest.mark.parametrize(
    ("tokens", "block_size", "exc", "words"),
    [
        ([1, -1], 1, ValueError, "outside"),
        ([1, 2**32], 1, ValueError, "outside"),
        ([1, "a"], 1, TypeError, "must be an int"),
        ("abc", 1, TypeError, "str"),
        (b"abc", 1, ValueError, "multiple of 4"),
        (np.array([-5], dtype=np.int64), 1, ValueError, "outside"),
        ([1, 2], 0, ValueError, "block_size"),
        ([1, 2], -3, ValueError, "block_size"),
        (3.5, 1, TypeError, "sequence"),
    ],
)
def test_bad_input_is_a_clear_error(tokens: object, block_size: int, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        hash_blocks(tokens, block_size)  # type: ignore[arg-type]


def test_bad_extra_key() -> None:
    with pytest.raises(TypeError, match="extra_key"):
        hash_blocks([1, 2], 1, 5)  # type: ignore[arg-type]


def test_public_api_reexports() -> None:
    assert kvrouter.hash_blocks is hash_blocks
