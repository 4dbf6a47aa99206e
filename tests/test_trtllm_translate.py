"""TensorRT-LLM KV cache event translation. Event dicts are written from the schema
TensorRT-LLM documents for LLM.get_kv_cache_events() (see translate.py)."""

from __future__ import annotations

from typing import Any

import pytest

from kvrouter.engines.trtllm.translate import (
    CapacityInfo,
    EventIdGap,
    TrtllmEventError,
    TrtllmTranslator,
    cache_level_to_tier,
    worker_id_for_rank,
)
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, Tier

BS = 4
BIG = (1 << 64) - 3  # u64 hashes above 2**63 happen
BIG_SIGNED = BIG - (1 << 64)


def tok(ids: list[int], extra: int = 0) -> list[dict[str, Any]]:
    return [{"type": "unique_token", "token_id": t, "token_extra_id": extra} for t in ids]


def block(h: int, ids: list[int], level: int = 0, lora: int | None = None,
          **more: Any) -> dict[str, Any]:
    return {"type": "stored_block", "block_hash": h, "tokens": tok(ids), "lora_id": lora,
            "cache_level": level, "priority": 35, **more}


def ev(data: dict[str, Any], event_id: int | None = None, window: int | None = 4096,
       rank: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"event_id": event_id, "data": data, "window_size": window}
    if rank is not None:
        out["attention_dp_rank"] = rank
    return out


def stored(parent: int | None, *blocks: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return ev({"type": "stored", "parent_hash": parent, "blocks": list(blocks)}, **kw)


def removed(*hashes: int, **kw: Any) -> dict[str, Any]:
    return ev({"type": "removed", "block_hashes": list(hashes)}, **kw)


def updated(h: int, level: tuple[int, int] | None = None,
            priority: tuple[int, int] | None = None, **kw: Any) -> dict[str, Any]:
    def diff(v: tuple[int, int] | None) -> dict[str, Any] | None:
        return None if v is None else {"type": "event_diff", "old_value": v[0],
                                       "new_value": v[1]}

    return ev({"type": "updated", "block_hash": h, "cache_level": diff(level),
               "priority": diff(priority)}, **kw)


def created(*levels: int, **kw: Any) -> dict[str, Any]:
    return ev({"type": "created", "num_blocks_per_cache_level": list(levels)}, **kw)


def test_created_reports_capacity_per_level_and_no_kv_events() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([created(1000, 4000, event_id=0)])
    assert out.capacity == [
        CapacityInfo(dp_rank=None, window_size=4096, cache_level=0, tier=Tier.GPU, num_blocks=1000),
        CapacityInfo(dp_rank=None, window_size=4096, cache_level=1, tier=Tier.HOST,
                     num_blocks=4000),
    ]
    assert out.events_for(None) == []
    assert t.indexed_window() == 4096


def test_stored_chains_full_blocks_and_skips_the_partial_last_block() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([
        stored(None, block(BIG_SIGNED, [1, 2, 3, 4]), block(11, [5, 6, 7, 8]),
               block(12, [9, 10])),
        stored(11, block(13, [9, 10, 11, 12])),
        removed(12),  # the partial block: never indexed, so its removal is not news
    ])
    assert out.events_for(None) == [
        BlockStored(hashes=(BIG, 11), parent=None, token_ids=(1, 2, 3, 4, 5, 6, 7, 8),
                    block_size=BS),
        BlockStored(hashes=(13,), parent=11, token_ids=(9, 10, 11, 12), block_size=BS),
    ]
    assert out.dropped == {"partial_block": 1, "unindexed_removed": 1}
    assert out.malformed == 0


def test_tiers_and_lora_split_a_stored_event_into_chained_runs() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([stored(
        BIG,
        block(1, [1, 1, 1, 1], lora=3),
        block(2, [2, 2, 2, 2], lora=3),
        block(3, [3, 3, 3, 3], level=1, lora=3),
        block(4, [4, 4, 4, 4], level=1),
        block(5, [5, 5, 5, 5], level=1, lora=0),
    )])
    assert out.events_for(None) == [
        BlockStored(hashes=(1, 2), parent=BIG, token_ids=(1,) * 4 + (2,) * 4, block_size=BS,
                    extra_key=b"lora-id:3"),
        BlockStored(hashes=(3,), parent=2, token_ids=(3,) * 4, block_size=BS, tier=Tier.HOST,
                    extra_key=b"lora-id:3"),
        BlockStored(hashes=(4, 5), parent=3, token_ids=(4,) * 4 + (5,) * 4, block_size=BS,
                    tier=Tier.HOST),
    ]


def test_removed_uses_the_tier_each_block_was_stored_in() -> None:
    t = TrtllmTranslator(BS)
    t.translate([stored(None, block(1, [1] * 4), block(2, [2] * 4, level=1))])
    out = t.translate([removed(1, BIG_SIGNED, 2)])
    assert out.events_for(None) == [
        BlockRemoved(hashes=(1, BIG), tier=Tier.GPU),  # unknown hash: assumed GPU
        BlockRemoved(hashes=(2,), tier=Tier.HOST),
    ]


def test_updated_cache_level_moves_the_block_between_tiers() -> None:
    t = TrtllmTranslator(BS)
    t.translate([stored(None, block(1, [1] * 4), block(2, [7, 8, 9, 10], lora=2))])
    out = t.translate([updated(2, level=(0, 1))])
    assert out.events_for(None) == [
        BlockStored(hashes=(2,), parent=1, token_ids=(7, 8, 9, 10), block_size=BS,
                    tier=Tier.HOST, extra_key=b"lora-id:2"),
        BlockRemoved(hashes=(2,), tier=Tier.GPU),
    ]
    # The block is now known to live on the host: its removal says so.
    assert t.translate([removed(2)]).events_for(None) == [BlockRemoved((2,), Tier.HOST)]
    # Unknown block: only the removal from the old tier.
    out = t.translate([updated(99, level=(0, 1))])
    assert out.events_for(None) == [BlockRemoved((99,), Tier.GPU)]
    assert out.dropped == {"tier_move_without_tokens": 1}
    # Priority-only and no-op updates change nothing but are counted.
    out = t.translate([updated(1, priority=(35, 80)), updated(1, level=(0, 0))])
    assert out.events_for(None) == []
    assert out.dropped == {"priority_update": 1}
    assert t.dropped["priority_update"] == 1


def test_non_text_blocks_are_not_indexed() -> None:
    t = TrtllmTranslator(BS)
    mm = block(2, [5, 6, 7, 8])
    mm["tokens"] = tok([5, 6, 7, 8], extra=77)  # multimodal / prompt-tuning embedding ids
    out = t.translate([
        stored(None, block(1, [1, 2, 3, 4]), mm, block(3, [9] * 4)),
        stored(None, block(4, [1] * 4, mm_keys=[["image-hash", 0]])),
        removed(2, 3),
    ])
    assert out.events_for(None) == [
        BlockStored(hashes=(1,), token_ids=(1, 2, 3, 4), block_size=BS),
    ]
    assert out.dropped == {"non_text_block": 2, "after_unindexed_block": 1,
                           "unindexed_removed": 2}


def test_only_the_largest_window_is_indexed() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([
        created(100, window=512),
        created(900, window=8192),
        stored(None, block(1, [1] * 4), window=512),
        stored(None, block(1, [1] * 4), window=8192),
        removed(1, window=512),  # the sliding window evicts; the full window still holds it
        updated(1, level=(0, 1), window=512),
    ])
    assert [c.window_size for c in out.capacity] == [512, 8192]
    assert out.events_for(None) == [BlockStored((1,), token_ids=(1,) * 4, block_size=BS)]
    assert out.dropped == {"other_window": 3}
    assert t.indexed_window() == 8192
    # A configured window wins.
    pinned = TrtllmTranslator(BS, window_size=512)
    out = pinned.translate([stored(None, block(1, [1] * 4), window=8192),
                            removed(1, window=512)])
    assert out.events_for(None) == [BlockRemoved((1,))]


def test_larger_window_after_indexing_a_smaller_one_clears_the_rank() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([
        stored(None, block(1, [1] * 4), window=1024),
        stored(None, block(2, [2] * 4), window=4096),
        stored(None, block(3, [3] * 4), window=1024),
    ])
    assert out.events_for(None) == [
        BlockStored((1,), token_ids=(1,) * 4, block_size=BS),
        AllCleared(),
        BlockStored((2,), token_ids=(2,) * 4, block_size=BS),
    ]
    assert out.dropped == {"window_switch": 1, "other_window": 1}


def test_attention_dp_ranks_are_separate_targets() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([
        stored(None, block(1, [1] * 4), rank=1, event_id=0),
        stored(None, block(1, [1] * 4), rank=0, event_id=0),
        updated(1, level=(0, 1), rank=1, event_id=1),
        removed(1, rank=0, event_id=1),
        created(10, rank=2, event_id=0),
    ])
    assert [g.dp_rank for g in out.groups] == [1, 0, 2]
    assert out.events_for(1) == [
        BlockStored((1,), token_ids=(1,) * 4, block_size=BS),
        BlockStored((1,), token_ids=(1,) * 4, block_size=BS, tier=Tier.HOST),
        BlockRemoved((1,), Tier.GPU),
    ]
    assert out.events_for(0) == [
        BlockStored((1,), token_ids=(1,) * 4, block_size=BS),
        BlockRemoved((1,), Tier.GPU),
    ]
    assert out.events_for(2) == []
    assert out.capacity[0].dp_rank == 2
    assert not out.event_id_gaps
    assert worker_id_for_rank("w7", 3) == "w7/dp3"
    assert worker_id_for_rank("w7", None) == "w7"


def test_event_id_gaps_are_reported_per_rank() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([removed(1, event_id=4), removed(1, event_id=5), removed(1, event_id=9),
                       removed(1, event_id=0, rank=1), removed(1, event_id=2, rank=1)])
    assert out.event_id_gaps == [EventIdGap(None, 6, 3), EventIdGap(1, 1, 1)]


@pytest.mark.parametrize(
    ("event", "match"),
    [
        ("not a dict", "event must be a dict"),
        ({"event_id": 1, "window_size": 4096}, "data must be a dict"),
        (ev({"blocks": []}), "no string 'type'"),
        ({**removed(1), "event_id": -1}, "event_id must be >= 0"),
        ({**removed(1), "window_size": 0}, "window_size must be >= 1"),
        ({**removed(1), "attention_dp_rank": "0"}, "attention_dp_rank must be an integer"),
        (created(1, 2, 3), "3 cache levels"),
        (created(-1), ">= 0"),
        (ev({"type": "created"}), "num_blocks_per_cache_level must be a list"),
        (stored(None, block(1, [1, 2, 3, 4, 5])), "5 tokens, more than tokens_per_block 4"),
        (stored(None, block(1, [1] * 4, level=2)), "unknown cache_level 2"),
        (stored(None, block(1, [1] * 4), block(2, [-1] * 4)), "token_id must be >= 0"),
        (stored(None, block(1, [1 << 32] * 4)), "exceeds u32"),
        (stored(None, {"tokens": tok([1] * 4)}), "no block_hash"),
        (stored(None, block(1.5, [1] * 4)), "block_hash must be an integer"),  # type: ignore[arg-type]
        (stored(None, block(1 << 64, [1] * 4)), "outside"),
        (stored("p", block(1, [1] * 4)), "parent_hash must be an integer"),
        (stored(None, {"block_hash": 1, "tokens": [{"token_extra_id": 0}]}), "no token_id"),
        (stored(None, {"block_hash": 1, "tokens": "abcd"}), "tokens must be a list"),
        (stored(None, block(1, [1] * 4, mm_keys="x")), "mm_keys must be a list"),
        (stored(None, block(1, [1] * 4, lora=True)), "lora_id must be an integer"),
        (ev({"type": "stored", "parent_hash": None}), "blocks must be a list"),
        (ev({"type": "removed", "block_hashes": [1, None]}), "must be an integer"),
        (ev({"type": "updated", "cache_level": None}), "no block_hash"),
        (updated(1, level=(0, 3)), "unknown cache_level 3"),
        (ev({"type": "updated", "block_hash": 1, "cache_level": {"new_value": 1}}),
         "needs old_value and new_value"),
    ],
)
def test_malformed_events_raise_and_change_nothing(event: Any, match: str) -> None:
    t = TrtllmTranslator(BS)
    with pytest.raises(TrtllmEventError, match=match):
        t.translate_event(event)
    assert t.malformed == 1
    # The same event inside a drained list is counted and skipped; the rest goes on.
    out = t.translate([event, stored(None, block(1, [1] * 4))])
    assert out.malformed == 1 and t.malformed == 2
    assert out.events_for(None) == [BlockStored((1,), token_ids=(1,) * 4, block_size=BS)]


def test_a_malformed_stored_event_registers_none_of_its_blocks() -> None:
    t = TrtllmTranslator(BS)
    bad = stored(None, block(1, [1] * 4), block(2, [2] * 4, level=5))
    with pytest.raises(TrtllmEventError):
        t.translate_event(bad)
    # Block 1 was not remembered: a tier move for it has no tokens to restore.
    out = t.translate([updated(1, level=(0, 1))])
    assert out.dropped == {"tier_move_without_tokens": 1}


def test_unknown_event_type_is_counted_and_bad_configuration_rejected() -> None:
    t = TrtllmTranslator(BS)
    out = t.translate([ev({"type": "evicted_to_the_moon", "block_hashes": [1]})])
    assert out.dropped == {"unknown_event_type": 1} and out.malformed == 0
    with pytest.raises(ValueError):
        TrtllmTranslator(0)
    with pytest.raises(ValueError):
        TrtllmTranslator(BS, window_size=0)
    assert cache_level_to_tier(0) is Tier.GPU and cache_level_to_tier(1) is Tier.HOST
    with pytest.raises(TrtllmEventError):
        cache_level_to_tier(True)


def test_tracked_blocks_are_bounded() -> None:
    t = TrtllmTranslator(BS, max_tracked_blocks=2)
    t.translate([stored(None, block(1, [1] * 4), block(2, [2] * 4), block(3, [3] * 4))])
    assert t.dropped["tracked_blocks_evicted"] == 1
    # Block 1 was forgotten (oldest): a tier move falls back to removal only.
    assert t.translate([updated(1, level=(0, 1))]).events_for(None) == [
        BlockRemoved((1,), Tier.GPU)
    ]
    assert len(t.translate([updated(3, level=(0, 1))]).events_for(None)) == 2


def test_translated_events_apply_to_the_router_index() -> None:
    core = pytest.importorskip("kvrouter._core")
    from kvrouter.events.codec import encode_payload

    t = TrtllmTranslator(BS)
    tokens = list(range(1, 13))
    out = t.translate([
        created(100, 400),
        stored(None, *(block(100 + i, tokens[i * BS:(i + 1) * BS]) for i in range(3)),
               block(200, [1, 2])),
        updated(102, level=(0, 1)),
    ])
    index = core.PrefixIndex(BS)
    result = index.apply_payload(1, encode_payload(out.events_for(None)))
    assert result.malformed == 0 and result.orphan_events == 0
    assert index.find_matches_tokens(tokens)[1] == (2, 1, 0)
    index.apply_payload(1, encode_payload(t.translate([removed(101, 102)]).events_for(None)))
    assert index.find_matches_tokens(tokens)[1] == (1, 0, 0)
