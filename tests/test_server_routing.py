"""Routing decisions and load accounting through a real `kvrouter serve` over loopback gRPC."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from kvrouter.client import RouterClient, WorkerState
from kvrouter.testing.wait import wait_until

BS = 4
MODEL = "m"


def _config(**router: Any) -> dict[str, Any]:
    # These workers never heartbeat: liveness is off unless a test turns it on.
    router.setdefault("heartbeat_timeout_s", 0)
    return {"router": router, "models": [{"name": MODEL, "block_size": BS, "seed": 7}]}


def _workers(client: RouterClient) -> dict[str, WorkerState]:
    return {w.name: w for w in client.list_workers(MODEL)}


PROMPT = list(range(100, 132))  # 8 blocks of 4


def test_equal_load_longest_prefix_wins(router_server: Any, store_blocks: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        for name, blocks in (("short", 2), ("mid", 4), ("long", 6), ("cold", 0)):
            c.register_worker(MODEL, name, block_size=BS)
            if blocks:
                store_blocks(c, MODEL, name, PROMPT[: blocks * BS], BS)
        d = c.route(PROMPT, MODEL, explain=True, dry_run=True)
        assert d.worker == "long"
        assert (d.overlap_blocks, d.prompt_blocks, d.prompt_tokens) == (6, 8, 32)
        overlap = {cand.worker: cand.gpu_blocks for cand in d.candidates}
        assert overlap == {"short": 2, "mid": 4, "long": 6, "cold": 0}
        assert [cand.worker for cand in d.candidates if cand.chosen] == ["long"]
        # A different prompt sharing only the first 3 blocks: "mid" and "long" tie on
        # overlap, both beat "short".
        other = PROMPT[: 3 * BS] + list(range(900, 920))
        d2 = c.route(other, MODEL, explain=True, dry_run=True)
        assert d2.worker in ("mid", "long") and d2.overlap_blocks == 3
        # Dry runs reserved nothing.
        assert all(w.reserved_requests == 0 for w in _workers(c).values())


def test_overloaded_worker_loses_to_cold_and_release_frees(router_server: Any,
                                                          store_blocks: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "hot", block_size=BS)
        c.register_worker(MODEL, "cold", block_size=BS)
        store_blocks(c, MODEL, "hot", PROMPT, BS)
        assert c.route(PROMPT, MODEL, dry_run=True).worker == "hot"

        # Pile long-running requests onto "hot" (candidates pin them there).
        held = [c.route(list(range(5000 + 64 * i, 5064 + 64 * i)), MODEL, candidates=["hot"],
                        expected_output_tokens=512) for i in range(4)]
        assert {d.worker for d in held} == {"hot"}
        hot = _workers(c)["hot"]
        assert hot.reserved_requests == 4
        assert hot.reserved_prefill_tokens > 0 and hot.reserved_decode_blocks > 0

        d = c.route(PROMPT, MODEL, explain=True, dry_run=True)
        assert d.worker == "cold", d

        # MarkPrefillDone moves prompt tokens out of prefill load; Release frees the rest.
        assert c.mark_prefill_done(held[0].request_id, MODEL)
        assert _workers(c)["hot"].reserved_prefill_tokens < hot.reserved_prefill_tokens
        for h in held:
            assert c.release(h.request_id, MODEL, worker="hot")
        assert not c.release(held[0].request_id, MODEL)  # second release: nothing left
        hot = _workers(c)["hot"]
        assert (hot.reserved_requests, hot.reserved_prefill_tokens,
                hot.reserved_decode_blocks) == (0, 0, 0)
        assert c.route(PROMPT, MODEL, dry_run=True).worker == "hot"


def test_lease_expiry_frees_load(router_server: Any) -> None:
    rp = router_server(_config(lease_s=0.5, expire_interval_s=0.1))
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "w", block_size=BS)
        d = c.route(PROMPT, MODEL, request_id="never-released", expected_output_tokens=64)
        assert d.request_id == "never-released"
        wait_until(lambda: _workers(c)["w"].reserved_requests == 0, 20,
                   what="the expired lease's reservation is dropped")
        w = _workers(c)["w"]
        assert (w.reserved_prefill_tokens, w.reserved_decode_blocks) == (0, 0)
        assert not c.release("never-released", MODEL)


def test_router_made_request_ids_are_unique_and_reserve(router_server: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "w", block_size=BS)
        ids = {c.route(PROMPT, MODEL).request_id for _ in range(20)}
        assert len(ids) == 20 and all(ids)
        assert _workers(c)["w"].reserved_requests == 20
        assert all(c.release(i, MODEL) for i in ids)
        assert _workers(c)["w"].reserved_requests == 0


def test_extra_key_separates_lora_caches(router_server: Any, store_blocks: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "lora", block_size=BS)
        c.register_worker(MODEL, "plain", block_size=BS)
        store_blocks(c, MODEL, "lora", PROMPT, BS, extra_key=b"adapter-a")
        store_blocks(c, MODEL, "plain", PROMPT[: 2 * BS], BS)
        d = c.route(PROMPT, MODEL, extra_key="adapter-a", explain=True, dry_run=True)
        assert (d.worker, d.overlap_blocks) == ("lora", 8)
        d = c.route(PROMPT, MODEL, explain=True, dry_run=True)
        assert (d.worker, d.overlap_blocks) == ("plain", 2)
        d = c.route(PROMPT, MODEL, extra_key="adapter-b", explain=True, dry_run=True)
        assert d.overlap_blocks == 0


def test_models_have_their_own_index_block_size_and_workers(router_server: Any,
                                                            store_blocks: Any) -> None:
    cfg = {"router": {"heartbeat_timeout_s": 0},
           "models": [{"name": "a", "block_size": 4}, {"name": "b", "block_size": 8,
                                                         "policy": "least_loaded"}]}
    rp = router_server(cfg)
    with RouterClient(rp.target) as c:
        c.register_worker("a", "wa", block_size=4)
        c.register_worker("b", "wb", block_size=8)
        store_blocks(c, "a", "wa", PROMPT, 4)
        da = c.route(PROMPT, "a", dry_run=True)
        db = c.route(PROMPT, "b", dry_run=True)
        assert (da.worker, da.overlap_blocks, da.block_size, da.policy) == ("wa", 8, 4, "kv")
        assert (db.worker, db.overlap_blocks, db.block_size, db.prompt_blocks) == ("wb", 0, 8, 4)
        assert db.policy == "least_loaded"
        # A per-request policy override.
        assert c.route(PROMPT, "a", dry_run=True, policy="round_robin").policy == "round_robin"
        models = {m.name: m for m in c.list_models()}
        assert (models["a"].indexed_blocks, models["b"].indexed_blocks) == (8, 0)
        with pytest.raises(grpc.RpcError) as e:
            c.route(PROMPT, "c")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'c'" in (e.value.details() or "")
