"""PrefixIndex API: payload apply, batch calls, bad input, snapshots, threads."""

from __future__ import annotations

import random
import threading

import msgpack
import pytest

from kvrouter import PrefixIndex, decode_payload, hash_blocks
from kvrouter.events.codec import encode_payload
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, Tier

BS = 4


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, **kw: object) -> BlockStored:
    return BlockStored(hashes=tuple(hashes), parent=parent, token_ids=tuple(tokens), block_size=BS, **kw)  # type: ignore[arg-type]


def test_payload_round_trip_and_apply() -> None:
    toks = list(range(16))
    payload = encode_payload([
        stored([11, 12], toks[:8]),
        stored([13, 14], toks[8:], parent=12, tier=Tier.HOST),
        BlockRemoved(hashes=(14,), tier=Tier.HOST),
    ])
    decoded = decode_payload(payload)
    assert [d[0] for d in decoded] == ["stored", "stored", "removed"]
    assert decoded[1][2] == 12 and decoded[1][6] == "host"
    idx = PrefixIndex(BS)
    res = idx.apply_payload(5, payload)
    assert (res.stored_blocks, res.removed_blocks, res.malformed) == (4, 1, 0)
    assert idx.find_matches(hash_blocks(toks, BS)) == {5: (2, 1, 0)}
    res = idx.apply_payload(5, encode_payload([AllCleared()]))
    assert res.cleared_blocks == 3
    assert idx.find_matches(hash_blocks(toks, BS)) == {}


def test_batch_apply_and_batch_query() -> None:
    idx = PrefixIndex(BS)
    seqs = [[w * 100 + i for i in range(8)] for w in range(4)]
    batch = [(w, encode_payload([stored([w * 10 + 1, w * 10 + 2], s)])) for w, s in enumerate(seqs)]
    results = idx.apply_payloads(batch)
    assert [r.stored_blocks for r in results] == [2, 2, 2, 2]
    answers = idx.find_matches_batch([hash_blocks(s, BS) for s in seqs])
    assert answers == [{w: (2, 0, 0)} for w in range(4)]


def test_malformed_payloads_change_nothing() -> None:
    idx = PrefixIndex(BS)
    idx.apply_payload(1, encode_payload([stored([1], [1, 2, 3, 4])]))
    before = idx.snapshot()
    bad = [
        b"",
        b"\xc1",
        msgpack.packb({"type": "stored"}),
        msgpack.packb([{"type": "stored", "hashes": [1], "tokens": b"\x00\x00"}]),
        msgpack.packb([{"type": "stored", "hashes": [1], "tokens": b"\x00" * 4, "block_size": 2}]),
        msgpack.packb([{"type": "removed", "hashes": ["x"]}]),
        msgpack.packb([{"type": "nope"}]),
        msgpack.packb([{"type": "removed", "hashes": [1], "tier": "tape"}]),
        msgpack.packb([{"type": "cleared"}]) + b"\x00",
        # a valid event followed by a broken one: all or nothing
        msgpack.packb([{"type": "cleared"}, {"type": "stored", "hashes": []}]),
        b"\xdd\xff\xff\xff\xff",  # declares a 4G-element array
    ]
    for p in bad:
        res = idx.apply_payload(1, p)
        assert res.malformed == 1 and res.error, p
        with pytest.raises(ValueError):
            decode_payload(p)
    rng = random.Random(0)
    good = encode_payload([stored([7, 8], list(range(8)))])
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            decode_payload(bytes(b))
        except ValueError:
            pass
    assert idx.snapshot()[:-8] != b"" and idx.find_matches(hash_blocks([1, 2, 3, 4], BS)) == {1: (1, 0, 0)}
    assert idx.stats()["malformed"] == len(bad)
    del before


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda i: i.apply_stored(1, [1], token_ids=[1, 2, 3, -1]), ValueError, "outside"),
        (lambda i: i.apply_stored(1, [1], token_ids=[1, 2, 3]), ValueError, "token ids for 1 blocks"),
        (lambda i: i.apply_stored(1, [2**64], token_ids=[1, 2, 3, 4]), ValueError, "64-bit"),
        (lambda i: i.apply_stored(1, [1], token_ids=[1, 2, 3, 4], tier="tape"), ValueError, "tier"),
        (lambda i: i.apply_stored(1, [], token_ids=[]), ValueError, "without block hashes"),
        (lambda i: i.apply_stored(1, [1]), ValueError, "tokens or router_hashes"),
        (lambda i: i.apply_stored(1, [1], token_ids=[1, 2, 3, 4], engine_block_size=0), ValueError,
         "engine_block_size"),
        (lambda i: i.apply_removed(1, [1], tier="floppy"), ValueError, "tier"),
        (lambda i: i.apply_removed(1, ["a"]), TypeError, "int"),
        (lambda i: i.load_snapshot(b"garbage"), ValueError, "snapshot"),
        (lambda i: PrefixIndex.from_snapshot(b"KVRSNAP\x01" + b"\x00" * 30), ValueError, "checksum"),
        (lambda i: PrefixIndex(0), ValueError, "block_size"),
    ],
)
def test_bad_calls_raise_and_change_nothing(call, exc, words) -> None:  # type: ignore[no-untyped-def]
    idx = PrefixIndex(BS)
    idx.apply_stored(3, [5, 6], token_ids=list(range(8)))
    before = idx.snapshot()
    with pytest.raises(exc, match=words):
        call(idx)
    assert idx.snapshot() == before


def test_negative_and_large_engine_hashes_are_u64() -> None:
    idx = PrefixIndex(BS)
    idx.apply_stored(1, [-1, 2**63 + 5], token_ids=list(range(8)))
    assert idx.worker_engine_hashes(1) == sorted([2**64 - 1, 2**63 + 5])
    idx.apply_removed(1, [2**64 - 1])
    assert idx.worker_blocks(1) == 1


def test_snapshot_round_trip_and_load() -> None:
    idx = PrefixIndex(BS)
    rng = random.Random(1)
    for w in range(8):
        toks = [rng.randrange(50) for _ in range(64)]
        idx.apply_stored(w, list(range(w * 100, w * 100 + 16)), token_ids=toks, tier=rng.choice(["gpu", "host"]))
    snap = idx.snapshot()
    other = PrefixIndex(BS)
    other.load_snapshot(snap)
    assert other.snapshot() == snap
    assert other.blocks_per_worker() == idx.blocks_per_worker()
    with pytest.raises(ValueError, match="block size"):
        PrefixIndex(8).load_snapshot(snap)
    with pytest.raises(ValueError):
        other.load_snapshot(snap[:-3])
    assert other.snapshot() == snap


def test_concurrent_threads_apply_and_query() -> None:
    idx = PrefixIndex(BS)
    seq = list(range(4096))
    hashes = hash_blocks(seq, BS)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(51):  # ends on a store
                idx.apply_stored(w, list(range(1, 1025)), token_ids=seq)
                if i % 2:
                    idx.clear_worker(w)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(200):
                for w, (gpu, host, disk) in idx.find_matches(hashes).items():
                    assert gpu in (1024,) and host == disk == 0, (w, gpu)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert idx.blocks_per_worker() == {0: 1024, 1: 1024, 2: 1024}


def test_load_snapshot_with_worker_map() -> None:
    idx = PrefixIndex(BS)
    idx.apply_stored(1, [5, 6], token_ids=list(range(8)))
    idx.apply_stored(2, [7], token_ids=list(range(4)))
    snap = idx.snapshot()
    other = PrefixIndex(BS)
    other.load_snapshot(snap, {1: 11, 2: 12})
    assert other.find_matches(hash_blocks(list(range(8)), BS)) == {11: (2, 0, 0), 12: (1, 0, 0)}
    with pytest.raises(ValueError, match="no entry in the worker map"):
        other.load_snapshot(snap, {1: 11})
    with pytest.raises(ValueError, match="two workers"):
        other.load_snapshot(snap, {1: 3, 2: 3})
    assert other.blocks_per_worker() == {11: 2, 12: 1}
