"""vLLM KV-event wire decoding: golden tests on frames captured from real vLLM
0.32.0 runs (../shared/engines/vllm-cpu/capture), plus hand-built payloads for the
map and array layouts and every malformed case."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from kvrouter.engines.vllm.wire import (
    END_OF_REPLAY,
    DecodedBatch,
    ReplayItem,
    SeqStatus,
    SeqTracker,
    VllmDecoder,
    WireError,
    decode_message,
    medium_to_tier,
    parse_replay_reply,
    replay_request,
)
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, Tier
from kvrouter.protocol import check_block_size, lora_extra_key
from kvrouter.shared_data import shared_dir

CAPTURE = shared_dir() / "engines" / "vllm-cpu" / "capture"
RUNS = [
    "run1_sha256_default",
    "run2_sha256_default_restart",
    "run3_sha256_PYTHONHASHSEED0",
    "run5_sha256_cbor",
]
BLOCK = 32

pytestmark = pytest.mark.skipif(not CAPTURE.is_dir(), reason="vLLM capture not available")


# --------------------------------------------------------------------------- helpers


def _frames(run: str, kind: str, i: int, n: int) -> list[bytes]:
    return [(CAPTURE / run / kind / f"{i:03d}.frame{k}.bin").read_bytes() for k in range(n)]


def _index(run: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CAPTURE / run / "index.json").read_text())
    return data


def _decoded(run: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CAPTURE / run / "decoded.json").read_text())
    return data


def _pub_batches(run: str) -> list[DecodedBatch]:
    decoder = VllmDecoder()
    count = len(_index(run)["pub"])
    return [decoder.decode_message(_frames(run, "pub", i, 3)) for i in range(count)]


def _events(run: str) -> Iterator[KvEvent]:
    for batch in _pub_batches(run):
        yield from batch.events


def _sequences(run: str) -> list[list[int]]:
    """prompt + output token ids of every request sent in the run."""
    return [r["prompt_token_ids"] + r["output_token_ids"] for r in _index(run)["requests"]]


def _stored_chains(run: str) -> dict[int, tuple[int, ...]]:
    """engine hash -> all tokens from the sequence start through that block, built
    only from the events' parent links and token ids."""
    prefix: dict[int, tuple[int, ...]] = {}
    held: set[int] = set()
    for event in _events(run):
        if isinstance(event, BlockStored):
            assert event.token_ids is not None
            if event.parent is None:
                chain: tuple[int, ...] = ()
            else:
                assert event.parent in held, "stored under a parent the engine no longer holds"
                chain = prefix[event.parent]
            for i, h in enumerate(event.hashes):
                chain += event.token_ids[i * event.block_size : (i + 1) * event.block_size]
                prefix[h] = chain
                held.add(h)
        elif isinstance(event, BlockRemoved):
            held.difference_update(event.hashes)
        else:
            held.clear()
    return prefix


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("run", RUNS)
def test_every_published_frame_decodes(run: str) -> None:
    decoded = _decoded(run)["pub"]
    expected_types = json.loads((CAPTURE / "description.json").read_text())["runs"][run][
        "event_types"
    ]
    batches = _pub_batches(run)
    assert len(batches) == len(decoded) == len(expected_types) == 15
    tracker = SeqTracker()
    names = {BlockStored: "BlockStored", BlockRemoved: "BlockRemoved",
             AllCleared: "AllBlocksCleared"}
    for batch, ref, types in zip(batches, decoded, expected_types, strict=True):
        assert batch.topic == b"kv"
        assert batch.seq == ref["seq"]
        assert batch.dp_rank == 0
        assert batch.ts == pytest.approx(ref["batch"]["ts"])
        assert not batch.dropped
        assert [names[type(e)] for e in batch.events] == types
        obs = tracker.observe("engine", batch.seq)
        assert obs.apply and obs.status in (SeqStatus.FIRST, SeqStatus.NEXT)
        for event, ref_event in zip(batch.events, ref["batch"]["events"], strict=True):
            if isinstance(event, AllCleared):
                continue
            assert list(event.hashes) == ref_event["block_hashes"]
            assert event.tier is Tier.GPU
            if isinstance(event, BlockStored):
                assert event.parent == ref_event["parent_block_hash"]
                assert list(event.token_ids or ()) == ref_event["token_ids"]
                assert event.block_size == BLOCK
                assert event.extra_key is None
    assert tracker.last("engine") == 14
    # Values >= 2**63 occur and stay unsigned.
    assert any(h >= 1 << 63 for e in _events(run) if isinstance(e, BlockStored) for h in e.hashes)


@pytest.mark.parametrize("run", RUNS)
def test_parent_chains_and_tokens_follow_the_requests(run: str) -> None:
    sequences = _sequences(run)
    chains = _stored_chains(run)
    # Every stored block, followed through its parents, is the start of a request's
    # prompt + output tokens, cut at a block boundary.
    for chain in chains.values():
        assert len(chain) % BLOCK == 0
        assert any(seq[: len(chain)] == list(chain) for seq in sequences)
    # Every request's full prompt blocks were stored (the 8-token partial block was not).
    stored_prefixes = set(chains.values())
    for seq, request in zip(sequences, _index(run)["requests"], strict=True):
        prompt = request["prompt_token_ids"]
        assert len(prompt) == 168
        for k in range(1, len(prompt) // BLOCK + 1):
            assert tuple(seq[: k * BLOCK]) in stored_prefixes
        assert tuple(prompt) not in stored_prefixes
    # The first event is request A's prompt: its 5 full blocks as one event.
    first = next(e for e in _events(run) if isinstance(e, BlockStored))
    assert first.parent is None and len(first.hashes) == 5
    assert list(first.token_ids or ()) == _index(run)["requests"][0]["prompt_token_ids"][:160]


def _vllm_sha256_pickle(chain: tuple[int, ...], seed: str) -> list[int]:
    """vLLM's default block hash (README: sha256 over pickle((parent digest,
    tokens, extra)), low 64 bits) - a test oracle for the captured values."""
    parent = hashlib.sha256(pickle.dumps(seed, protocol=5)).digest()
    out = []
    for i in range(0, len(chain), BLOCK):
        parent = hashlib.sha256(
            pickle.dumps((parent, tuple(chain[i : i + BLOCK]), None), protocol=5)
        ).digest()
        out.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    return out


@pytest.mark.parametrize(
    ("run", "seed"),
    [
        ("run1_sha256_default", "vllm-none-hash"),
        ("run2_sha256_default_restart", "vllm-none-hash"),
        ("run3_sha256_PYTHONHASHSEED0", "0"),
    ],
)
def test_decoded_hashes_are_vllms_block_hashes(run: str, seed: str) -> None:
    chains = _stored_chains(run)
    assert len(chains) >= 10
    for engine_hash, chain in chains.items():
        assert _vllm_sha256_pickle(chain, seed)[-1] == engine_hash


def test_restart_keeps_hashes_and_seed_or_algo_changes_them() -> None:
    def hashes(run: str) -> list[int]:
        return [h for e in _events(run) if isinstance(e, BlockStored | BlockRemoved)
                for h in e.hashes]

    run1, run2 = hashes("run1_sha256_default"), hashes("run2_sha256_default_restart")
    run3, run5 = hashes("run3_sha256_PYTHONHASHSEED0"), hashes("run5_sha256_cbor")
    assert run1 == run2
    assert len(run1) == len(run3) == len(run5)
    assert not set(run1) & set(run3)
    assert not set(run1) & set(run5)
    # Same tokens in all runs: the router does not care about engine hashes.
    def tokens(run: str) -> list[tuple[int, ...] | None]:
        return [e.token_ids for e in _events(run) if isinstance(e, BlockStored)]

    assert tokens("run1_sha256_default") == tokens("run3_sha256_PYTHONHASHSEED0")
    assert tokens("run1_sha256_default") == tokens("run5_sha256_cbor")


@pytest.mark.parametrize("run", RUNS)
def test_replay_dealer_stream_decodes_and_ends_at_minus_one(run: str) -> None:
    replies = _index(run)["replay_dealer"]
    assert len(replies) == 16
    items: list[ReplayItem | None] = [
        parse_replay_reply(_frames(run, "replay_dealer", i, 4)) for i in range(len(replies))
    ]
    assert items[-1] is None  # [b"", b"", ff*8, b""]
    assert all(item is not None for item in items[:-1])
    pub = _pub_batches(run)
    decoder = VllmDecoder()
    for i, item in enumerate(items[:-1]):
        assert item is not None
        assert item.seq == i and item.topic == b"kv"
        assert item.payload == _frames(run, "pub", i, 3)[2]
        replayed = decoder.decode_replay(item)
        assert replayed.events == pub[i].events
    # The single reply a REQ socket got: the delimiter is stripped by REQ.
    req = decode_message(_frames(run, "replay", 0, 3))
    assert req.seq == 0 and req.events == pub[0].events


def test_router_hashes_identical_across_runs() -> None:
    core = pytest.importorskip("kvrouter._core")
    from kvrouter.events.codec import encode_payload

    final = _sequences("run1_sha256_default")[-1]  # A after reset_prefix_cache: what is held
    for router_block in (BLOCK, BLOCK // 2):
        expected = core.hash_blocks(final, router_block)
        assert len(expected) == 200 // router_block
        held_per_run = []
        for run in RUNS:
            index = core.PrefixIndex(router_block)
            for batch in _pub_batches(run):
                result = index.apply_payload(7, encode_payload(batch.events))
                assert result.malformed == 0 and result.orphan_events == 0
            held = sorted(h for h, _tiers in index.worker_router_hashes(7))
            held_per_run.append(held)
            assert held == sorted(expected)
            assert index.find_matches_tokens(final)[7][0] == len(expected)
        assert all(h == held_per_run[0] for h in held_per_run)


# --------------------------------------------------------------------------- layouts


H1 = (1 << 64) - 5  # u64 above 2**63
H1_SIGNED = H1 - (1 << 64)  # the same hash as a signed i64
H2_DIGEST = bytes(range(32))  # 32-byte digest: low 64 bits, big-endian
H2 = int.from_bytes(H2_DIGEST[-8:], "big")
TOKENS = list(range(100, 108))  # two blocks of 4


def _message(events: list[Any], seq: int = 3, dp_rank: int | None = 0,
             topic: bytes = b"kv") -> list[bytes]:
    batch: list[Any] = [1700000000.25, events] + ([] if dp_rank is None else [dp_rank])
    return [topic, seq.to_bytes(8, "big"), msgpack.packb(batch, use_bin_type=True)]


def test_map_layout_with_defaults_omitted() -> None:
    events = [
        {"type": "BlockRemoved", "block_hashes": [H1_SIGNED], "medium": "CPU"},
        {
            "type": "BlockStored",
            "block_hashes": [H1_SIGNED, H2_DIGEST],
            "parent_block_hash": 42,
            "token_ids": TOKENS,
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        },
        {
            "type": "BlockStored",
            "block_hashes": [7],
            "parent_block_hash": H2_DIGEST,
            "token_ids": TOKENS[:4],
            "block_size": 4,
            "lora_id": 3,
            "medium": "CPU",
            "lora_name": "adapter-a",
            "extra_keys": [["adapter-a"]],
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
            "some_future_field": {"x": 1},
        },
        {"type": "BlockRemoved", "block_hashes": [H2_DIGEST], "medium": "STORAGE"},
        {"type": "AllBlocksCleared"},
    ]
    batch = VllmDecoder().decode_message(_message(events, seq=9))
    assert batch.seq == 9 and batch.topic == b"kv" and batch.dp_rank == 0
    assert batch.ts == 1700000000.25
    assert batch.events == [
        BlockRemoved(hashes=(H1,), tier=Tier.HOST),
        BlockStored(hashes=(H1, H2), parent=42, token_ids=tuple(TOKENS), block_size=4),
        BlockStored(hashes=(7,), parent=H2, token_ids=tuple(TOKENS[:4]), block_size=4,
                    tier=Tier.HOST, extra_key=b"adapter-a"),
        BlockRemoved(hashes=(H2,), tier=Tier.DISK),
        AllCleared(),
    ]
    assert not batch.dropped


def test_array_layout_with_omitted_trailing_fields() -> None:
    events = [
        ["BlockStored", [H1], None, TOKENS[:4], 4],  # no lora_id, no medium
        ["BlockStored", [H1_SIGNED + 1], H1_SIGNED, TOKENS[4:], 4, 5],  # lora_id only
        ["BlockStored", [H2_DIGEST], None, TOKENS[:4], 4, None, "cpu", None, [None], 0,
         "full_attention", None, "LOCAL", None, None, "a field from the future"],
        ["BlockRemoved", [H1]],  # no medium
        ["BlockRemoved", [H2_DIGEST], "CPU", 0],
        ["AllBlocksCleared"],
    ]
    batch = VllmDecoder().decode_message(_message(events, dp_rank=None, topic=b""))
    assert batch.dp_rank is None and batch.topic == b""
    assert batch.events == [
        BlockStored(hashes=(H1,), parent=None, token_ids=tuple(TOKENS[:4]), block_size=4),
        BlockStored(hashes=(H1 + 1,), parent=H1, token_ids=tuple(TOKENS[4:]), block_size=4,
                    extra_key=b"lora-id:5"),
        BlockStored(hashes=(H2,), token_ids=tuple(TOKENS[:4]), block_size=4, tier=Tier.HOST),
        BlockRemoved(hashes=(H1,), tier=Tier.GPU),
        BlockRemoved(hashes=(H2,), tier=Tier.HOST),
        AllCleared(),
    ]


def test_unrepresentable_and_filtered_events_are_counted_not_indexed() -> None:
    decoder = VllmDecoder()
    stored = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
              "token_ids": TOKENS[:4], "block_size": 4, "lora_id": None, "medium": "GPU",
              "lora_name": None, "group_idx": 2, "kv_cache_spec_kind": "full_attention"}
    events = [
        {**stored, "extra_keys": [["mm-hash-abc", 0]]},  # multimodal content; selects group 2
        {**stored, "lora_name": "a", "extra_keys": [["a", "salt"]]},  # cache salt too
        {**stored, "kv_cache_spec_kind": "sliding_window", "group_idx": 1},
        stored,
        {**stored, "group_idx": 3, "kv_cache_spec_kind": "mla_attention"},  # another group
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 1},
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 2},
        {"type": "BlockMigrated", "block_hashes": [1]},  # an event type from the future
        ["SomethingNew", 1, 2],
        {**stored, "block_hashes": [], "token_ids": []},
    ]
    batch = decoder.decode_message(_message(events))
    assert batch.events == [
        BlockStored(hashes=(1,), token_ids=tuple(TOKENS[:4]), block_size=4),
        BlockRemoved(hashes=(1,)),
    ]
    assert batch.dropped == {
        "unrepresentable_extra_keys": 2,
        "not_full_attention": 1,
        "other_kv_cache_group": 2,
        "unknown_event_type": 2,
        "empty_event": 1,
    }
    assert decoder.group_idx == 2
    assert decoder.dropped == batch.dropped
    # A configured group wins over auto-selection.
    pinned = VllmDecoder(group_idx=3)
    assert len(pinned.decode_message(_message(events)).events) == 1


def test_removal_before_any_store_passes_through() -> None:
    msg = _message([{"type": "BlockRemoved", "block_hashes": [5], "medium": None,
                     "group_idx": 4}])
    assert VllmDecoder().decode_message(msg).events == [BlockRemoved(hashes=(5,))]


GOOD_STORED = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
               "token_ids": [1, 2], "block_size": 2, "lora_id": None, "medium": "GPU",
               "lora_name": None}


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([b"kv", b"\0" * 8], "2 frames"),
        ([b"kv", b"\0" * 7, msgpack.packb([0.0, []])], "sequence frame has 7 bytes"),
        ([b"kv", b"\0" * 8, b"\xc1"], "not valid msgpack"),
        ([b"kv", b"\0" * 8, msgpack.packb([0.0, []]) + b"\x00"], "not valid msgpack"),
        ([b"kv", b"\0" * 8, msgpack.packb({"ts": 0.0})], "batch must be an array"),
        ([b"kv", b"\0" * 8, msgpack.packb([0.0, {}, 0])], "events must be an array"),
        ([b"kv", b"\0" * 8, msgpack.packb(["x", [], 0])], "timestamp"),
        ([b"kv", b"\0" * 8, msgpack.packb([0.0, [], -1])], "data parallel rank"),
        (_message(["not an event"]), "map or an array"),
        (_message([{"block_hashes": [1]}]), "no string 'type'"),
        (_message([[]]), "type tag"),
        (_message([["BlockStored", [1], None, [1, 2]]]), "at least 4"),
        (_message([["BlockRemoved"]]), "at least 1"),
        (_message([{**GOOD_STORED, "token_ids": [1, 2, 3]}]), "3 token ids for 1 blocks of 2"),
        (_message([{**GOOD_STORED, "token_ids": [1, -2]}]), "token id -2"),
        (_message([{**GOOD_STORED, "token_ids": [1, 1 << 32]}]), "unsigned 32-bit"),
        (_message([{**GOOD_STORED, "token_ids": [1, True]}]), "token id True"),
        (_message([{**GOOD_STORED, "block_size": 0, "token_ids": []}]), "block_size"),
        (_message([{k: v for k, v in GOOD_STORED.items() if k != "block_size"}]),
         "no block_size"),
        (_message([{**GOOD_STORED, "block_hashes": [1.5]}]), "integer or bytes, got float"),
        (_message([{**GOOD_STORED, "block_hashes": [b""]}]), "0 bytes"),
        (_message([{**GOOD_STORED, "block_hashes": [b"\x01" * 33]}]), "33 bytes"),
        (_message([{**GOOD_STORED, "block_hashes": [True]}]), "integer or bytes"),
        (_message([{**GOOD_STORED, "block_hashes": 5}]), "must be an array"),
        (_message([{**GOOD_STORED, "parent_block_hash": "abc"}]), "parent_block_hash"),
        (_message([{**GOOD_STORED, "medium": "TAPE"}]), "unknown storage medium"),
        (_message([{**GOOD_STORED, "medium": 3}]), "medium must be a string"),
        (_message([{**GOOD_STORED, "lora_name": 3}]), "lora_name"),
        (_message([{**GOOD_STORED, "extra_keys": [None, None]}]), "one entry per block"),
        (_message([{**GOOD_STORED, "extra_keys": ["x"]}]), "extra_keys entry"),
        (_message([{"type": "BlockRemoved", "medium": "GPU"}]), "BlockRemoved has no"),
    ],
)
def test_malformed_input_raises_wire_error(frames: list[bytes], match: str) -> None:
    decoder = VllmDecoder()
    with pytest.raises(WireError, match=match):
        decoder.decode_message(frames)
    assert decoder.malformed == 1
    assert decoder.group_idx is None  # nothing was committed
    # A good event in the same batch as a bad one is not applied either (all or nothing).
    with pytest.raises(WireError):
        decoder.decode_message(_message([GOOD_STORED, {**GOOD_STORED, "medium": "TAPE"}]))
    assert decoder.group_idx is None and decoder.malformed == 2


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


# --------------------------------------------------------------------------- helpers


def test_medium_and_lora_mapping() -> None:
    assert medium_to_tier(None) is Tier.GPU
    assert medium_to_tier("GPU") is Tier.GPU
    assert medium_to_tier("cpu") is Tier.HOST
    assert medium_to_tier("STORAGE") is Tier.DISK
    assert medium_to_tier("nvme") is Tier.DISK
    with pytest.raises(WireError):
        medium_to_tier("somewhere")
    assert lora_extra_key(None, None) is None
    assert lora_extra_key(None, 0) is None
    assert lora_extra_key("tuned-ü", 9) == "tuned-ü".encode()
    assert lora_extra_key(None, 9) == b"lora-id:9"


def test_check_block_size() -> None:
    assert check_block_size(32, 32) is None
    assert check_block_size(32, 16) is None  # split 2:1 by the index
    assert check_block_size(64, 16) is None
    reason = check_block_size(16, 32)
    assert reason is not None and "smaller" in reason and "divisor of 16" in reason
    reason = check_block_size(48, 32)
    assert reason is not None and "not a multiple" in reason
    assert check_block_size(1, 16) is not None  # SGLang's default page size
    assert "not positive" in (check_block_size(0, 16) or "")
    assert "not positive" in (check_block_size(16, 0) or "")


def test_replay_protocol_helpers() -> None:
    assert replay_request(0) == [b"", b"\0" * 8]
    assert replay_request(258) == [b"", b"\0" * 6 + b"\x01\x02"]
    with pytest.raises(ValueError):
        replay_request(-1)
    assert parse_replay_reply([b"", b"", END_OF_REPLAY, b""]) is None
    item = parse_replay_reply([b"", b"kv", (5).to_bytes(8, "big"), b"payload"])
    assert item == ReplayItem(topic=b"kv", seq=5, payload=b"payload")
    with pytest.raises(WireError, match="4"):
        parse_replay_reply([b"kv", (5).to_bytes(8, "big"), b"payload"])
    with pytest.raises(WireError, match="delimiter"):
        parse_replay_reply([b"x", b"kv", (5).to_bytes(8, "big"), b"payload"])
    with pytest.raises(WireError, match="sequence frame"):
        parse_replay_reply([b"", b"kv", b"\x05", b"payload"])


def test_replay_over_real_zmq_dealer_router() -> None:
    """The DEALER frames reach a ROUTER as vLLM's replay socket reads them, and its
    replies (captured frames, sent the way vLLM sends them) parse back."""
    zmq = pytest.importorskip("zmq")
    run = "run1_sha256_default"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart(replay_request(12))
        assert router.poll(5000)
        identity, delimiter, start = router.recv_multipart()
        assert delimiter == b"" and int.from_bytes(start, "big") == 12
        for i in range(int.from_bytes(start, "big"), 15):
            topic, seq, payload = _frames(run, "pub", i, 3)
            router.send_multipart([identity, b"", topic, seq, payload])
        router.send_multipart([identity, b"", b"", END_OF_REPLAY, b""])
        decoder = VllmDecoder()
        tracker = SeqTracker()
        tracker.resync("engine", 11)
        seen = []
        while True:
            assert dealer.poll(5000)
            item = parse_replay_reply(dealer.recv_multipart())
            if item is None:
                break
            assert tracker.observe("engine", item.seq).status is SeqStatus.NEXT
            seen.append(decoder.decode_replay(item).seq)
        assert seen == [12, 13, 14]
    finally:
        dealer.close()
        router.close()
        ctx.term()


def test_seq_tracker_gaps_restarts_and_duplicates() -> None:
    t = SeqTracker(stale_limit=3)
    first = t.observe("a", 0)
    assert first.status is SeqStatus.FIRST and first.apply
    assert t.observe("a", 1).status is SeqStatus.NEXT
    gap = t.observe("a", 4)
    assert gap.status is SeqStatus.GAP and gap.first_missing == 2 and gap.missing == 2
    assert not gap.apply
    # Still missing until the replayed batches arrive; the tracker did not advance.
    assert t.observe("a", 5).first_missing == 2
    for seq in (2, 3, 4, 5):  # replay from 2 (includes the gap batch and later ones)
        assert t.observe("a", seq).status is SeqStatus.NEXT
    assert t.observe("a", 5).status is SeqStatus.DUPLICATE  # live copy of a replayed batch
    restart = t.observe("a", 0)
    assert restart.status is SeqStatus.RESTART and restart.apply
    assert t.last("a") == 0
    # Publishers are independent.
    late = t.observe("b", 7)
    assert late.status is SeqStatus.FIRST and late.first_missing == 0 and late.missing == 7
    assert not late.apply and t.last("b") is None
    t.resync("b", 7)
    assert t.observe("b", 8).status is SeqStatus.NEXT
    # A restart whose seq 0 was missed: duplicates until stale_limit, then RESTART.
    assert t.observe("b", 2).status is SeqStatus.DUPLICATE
    assert t.observe("b", 3).status is SeqStatus.DUPLICATE
    missed = t.observe("b", 4)
    assert missed.status is SeqStatus.RESTART and missed.first_missing == 0
    assert t.last("b") is None
    with pytest.raises(ValueError):
        t.observe("a", -1)
    with pytest.raises(ValueError):
        SeqTracker(stale_limit=0)
