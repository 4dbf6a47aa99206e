"""Property test: random event sequences drive the Rust index and a simple Python
reference model (tests/reference_index.py); every query must agree."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrouter import PrefixIndex, hash_blocks
from tests.reference_index import RefIndex, spec_hash_blocks

BS = 2
WORKERS = [1, 2, 3]
TIERS = ["gpu", "host", "disk"]

op = st.one_of(
    st.tuples(
        st.just("store"),
        st.sampled_from(WORKERS),
        st.integers(0, 12),  # parent choice: 0 = root, else index into known / random
        st.integers(1, 3),  # blocks
        st.sampled_from([BS, 2 * BS, 3]),  # engine block size (3: mismatch)
        st.sampled_from(TIERS),
        st.sampled_from([None, b"lora-a"]),
        st.lists(st.integers(0, 3), min_size=12, max_size=12),  # tokens from a tiny vocab
        st.lists(st.integers(1, 40), min_size=3, max_size=3),  # engine hashes from a small pool
    ),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), st.lists(st.integers(1, 45), max_size=4),
              st.sampled_from(TIERS)),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS)),
    st.tuples(st.just("drop"), st.sampled_from(WORKERS)),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), queries=st.lists(st.lists(st.integers(0, 3), max_size=16), max_size=12))
def test_index_agrees_with_reference(ops: list[tuple], queries: list[list[int]]) -> None:
    idx = PrefixIndex(BS)
    ref = RefIndex(BS)
    history: list[list[int]] = []  # token sequences that were stored from the root, for queries
    known: dict[int, list[int]] = {}  # engine hash -> token prefix ending at it (per any worker)
    for o in ops:
        if o[0] == "store":
            _, w, pchoice, n, ebs, tier, key, toks, ehashes = o
            hashes = ehashes[:n]
            tokens = toks[: n * ebs] if ebs <= 4 else toks
            if len(tokens) < n * ebs:
                continue
            pool = sorted(known)
            parent = None if pchoice == 0 or not pool else pool[pchoice % len(pool)]
            if pchoice == 12:
                parent = 999  # never stored: an orphan
            outcome = ref.stored(w, hashes, parent, tokens, ebs, tier, key)
            res = idx.apply_stored(w, hashes, parent=parent, token_ids=tokens, tier=tier,
                                   extra_key=key, engine_block_size=ebs)
            assert (res.orphan_events == 1) == (outcome == "orphan")
            assert (res.mismatched_events == 1) == (outcome == "mismatch")
            if outcome == "ok":
                prefix = (known.get(parent, []) if parent is not None else []) + tokens
                if key is None:
                    history.append(prefix)
                for i, eh in enumerate(hashes):
                    known[eh] = (known.get(parent, []) if parent is not None else []) + tokens[: (i + 1) * ebs]
        elif o[0] == "remove":
            _, w, hashes, tier = o
            ref.removed(w, hashes, tier)
            idx.apply_removed(w, hashes, tier)
        elif o[0] == "clear":
            ref.cleared(o[1])
            idx.clear_worker(o[1])
        else:
            ref.remove_worker(o[1])
            idx.remove_worker(o[1])

    candidates = queries + history + [h[: len(h) // 2] + q for h in history for q in queries[:2]]
    for q in candidates:
        hashes = hash_blocks(q, BS)
        assert hashes == spec_hash_blocks(q, BS)
        assert idx.find_matches(hashes) == ref.find_matches(hashes), q
    expected_blocks = {w: n for w, n in ref.blocks_per_worker().items()}
    got_blocks = idx.blocks_per_worker()
    assert {w: n for w, n in got_blocks.items() if n} == {w: n for w, n in expected_blocks.items() if n}
    for w in WORKERS:
        assert idx.worker_router_hashes(w) == ref.router_hashes(w)
    # A snapshot round trip preserves every answer.
    back = PrefixIndex.from_snapshot(idx.snapshot())
    for q in candidates:
        hashes = hash_blocks(q, BS)
        assert back.find_matches(hashes) == idx.find_matches(hashes)
    assert back.snapshot() == idx.snapshot()
