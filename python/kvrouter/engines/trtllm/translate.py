"""TensorRT-LLM KV cache events -> kvrouter events.

Input: the event dicts `LLM.get_kv_cache_events()` / `get_kv_cache_events_async()`
return (each event can be read only once, so the adapter is their only reader)::

    {"event_id": int, "window_size": int, "attention_dp_rank": int (optional),
     "data": {"type": "created", "num_blocks_per_cache_level": [int, ...]}
           | {"type": "stored", "parent_hash": int | None,
              "blocks": [{"type": "stored_block", "block_hash": int,
                          "tokens": [{"type": "unique_token", "token_id": int,
                                      "token_extra_id": int}, ...],
                          "lora_id": int | None, "cache_level": int, "priority": int,
                          "mm_keys": [...] (newer versions)}, ...]}
           | {"type": "removed", "block_hashes": [int, ...]}
           | {"type": "updated", "block_hash": int,
              "cache_level": {"old_value": int, "new_value": int} | None,
              "priority": {"old_value": int, "new_value": int} | None}}

Rules (why, where it is not obvious):

* Hashes are u64 and may exceed 2**63; pybind may hand them over signed. Both
  normalise through kvrouter.protocol.normalise_engine_hash.
* cache_level -> tier: 0 is the primary pool (GPU memory) -> gpu; 1 is the
  secondary pool blocks are offloaded to (host memory) -> host. Other levels are
  rejected: guessing would mis-score hits.
* A stored block with fewer tokens than tokens_per_block (a partial last block,
  reusable in TensorRT-LLM) is not indexed: the router indexes full blocks only
  (docs/design.md §3.1). Its hash is remembered so its removal is not reported as unknown.
* Blocks whose tokens carry a non-zero token_extra_id (multimodal / prompt-tuning
  embeddings) or that list mm_keys hold KV that token ids alone do not describe;
  they and the rest of their event's chain are dropped and counted rather than
  indexed as if they were plain text.
* lora_id -> extra_key via kvrouter.protocol.lora_extra_key, i.e.
  b"lora-id:<id>": the router must fold the same bytes into requests that use
  LoRA task <id>. Missing / None / 0 means the base model.
* updated with a cache_level change (offload / onboard): the block moved tiers.
  When its tokens are known (it was stored through this translator) this emits
  BlockStored in the new tier then BlockRemoved from the old tier, so the block
  is never absent from the index in between. When they are not known, only the
  removal from the old tier is emitted: the router forgets a block it cannot
  describe instead of claiming a hit it cannot verify. Priority changes only
  affect TensorRT-LLM's eviction order: ignored, counted.
* window_size: with variable sliding-window attention every window has its own
  block pool and publishes events for the same block hashes. A prefix is only
  reusable while the full-attention (largest) window still holds it, and a
  sliding-window pool evicting a block says nothing about the full-attention
  pool; so only one window is indexed: the configured one, else the largest seen
  (created events announce every window at start-up). Events of other windows
  are dropped and counted. If a larger window shows up after a smaller one was
  indexed, that rank's blocks are cleared (AllCleared) and the larger one wins.
* attention_dp_rank: with attention data parallelism each rank has its own KV
  cache and is its own routing target. translate() returns events grouped by
  rank (in order of first appearance, order kept within a rank); publish each
  group as worker `worker_id_for_rank(worker, rank)` ("<worker>/dp<rank>").
* event_id is per rank and increases by one; a jump means the engine's event
  buffer overflowed and events were lost: reported in Translation.event_id_gaps
  so the adapter can resynchronise that worker (a new epoch).
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, Tier
from kvrouter.protocol import U32_MAX, lora_extra_key, normalise_engine_hash

log = logging.getLogger(__name__)

CACHE_LEVEL_TIERS: dict[int, Tier] = {0: Tier.GPU, 1: Tier.HOST}


class TrtllmEventError(ValueError):
    """An event dict that does not follow TensorRT-LLM's documented schema."""


@dataclass(frozen=True, slots=True)
class CapacityInfo:
    """KV cache capacity announced by a `created` event (one record per cache level)."""

    dp_rank: int | None
    window_size: int | None
    cache_level: int
    tier: Tier
    num_blocks: int


@dataclass(slots=True)
class RankEvents:
    dp_rank: int | None
    events: list[KvEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EventIdGap:
    dp_rank: int | None
    first_missing: int
    missing: int


@dataclass(slots=True)
class Translation:
    groups: list[RankEvents] = field(default_factory=list)
    capacity: list[CapacityInfo] = field(default_factory=list)
    event_id_gaps: list[EventIdGap] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    malformed: int = 0

    def events_for(self, dp_rank: int | None) -> list[KvEvent]:
        for group in self.groups:
            if group.dp_rank == dp_rank:
                return group.events
        return []


def worker_id_for_rank(worker: str, dp_rank: int | None) -> str:
    """Routing-target name of one attention-DP rank of a worker."""
    return worker if dp_rank is None else f"{worker}/dp{dp_rank}"


def cache_level_to_tier(level: object) -> Tier:
    if not isinstance(level, int) or isinstance(level, bool) or level not in CACHE_LEVEL_TIERS:
        raise TrtllmEventError(f"unknown cache_level {level!r} (expected 0 = GPU or 1 = host)")
    return CACHE_LEVEL_TIERS[level]


# --------------------------------------------------------------------------- parsing


def _int(value: object, what: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TrtllmEventError(f"{what} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise TrtllmEventError(f"{what} must be >= {minimum}, got {value}")
    return value


def _opt_int(value: object, what: str, minimum: int | None = None) -> int | None:
    return None if value is None else _int(value, what, minimum)


def _hash(value: object, what: str) -> int:
    return normalise_engine_hash(value, what, TrtllmEventError)


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TrtllmEventError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _list(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise TrtllmEventError(f"{what} must be a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class _ParsedBlock:
    hash: int
    tokens: tuple[int, ...]
    plain: bool  # no token_extra_id, no mm_keys
    extra_key: bytes | None
    tier: Tier


def _parse_block(raw: object, i: int) -> _ParsedBlock:
    block = _mapping(raw, f"blocks[{i}]")
    if "block_hash" not in block:
        raise TrtllmEventError(f"blocks[{i}] has no block_hash")
    h = _hash(block["block_hash"], f"blocks[{i}].block_hash")
    tokens: list[int] = []
    plain = True
    for j, tok in enumerate(_list(block.get("tokens"), f"blocks[{i}].tokens")):
        tok = _mapping(tok, f"blocks[{i}].tokens[{j}]")
        if "token_id" not in tok:
            raise TrtllmEventError(f"blocks[{i}].tokens[{j}] has no token_id")
        tid = _int(tok["token_id"], f"blocks[{i}].tokens[{j}].token_id", 0)
        if tid > U32_MAX:
            raise TrtllmEventError(f"blocks[{i}].tokens[{j}].token_id {tid} exceeds u32")
        extra = _opt_int(tok.get("token_extra_id"), f"blocks[{i}].tokens[{j}].token_extra_id")
        if extra:
            plain = False
        tokens.append(tid)
    mm_keys = block.get("mm_keys")
    if mm_keys is not None and _list(mm_keys, f"blocks[{i}].mm_keys"):
        plain = False
    lora_id = _opt_int(block.get("lora_id"), f"blocks[{i}].lora_id")
    tier = cache_level_to_tier(block.get("cache_level", 0))
    # priority (eviction order) is engine-internal, not routing state: checked, unused.
    _opt_int(block.get("priority"), f"blocks[{i}].priority")
    return _ParsedBlock(h, tuple(tokens), plain, lora_extra_key(None, lora_id), tier)


def _parse_diff(value: object, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    diff = _mapping(value, what)
    if "old_value" not in diff or "new_value" not in diff:
        raise TrtllmEventError(f"{what} needs old_value and new_value")
    old = _int(diff["old_value"], f"{what}.old_value")
    return old, _int(diff["new_value"], f"{what}.new_value")


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Known:
    parent: int | None
    tokens: bytes  # array('I') bytes: 4 bytes per token, compact
    extra_key: bytes | None
    tier: Tier


@dataclass(slots=True)
class _RankState:
    window: int | None = None  # the window being indexed
    indexed_any: bool = False
    known: dict[int, _Known] = field(default_factory=dict)
    unindexed: set[int] = field(default_factory=set)  # partial / non-plain block hashes
    last_event_id: int | None = None


class TrtllmTranslator:
    """Translates one TensorRT-LLM executor's KV cache events (all its DP ranks).

    Keeps per rank what it needs to translate later events: the tokens of every
    indexed block (4 bytes per token; for tier moves) and the hashes of blocks it
    did not index (so their removals are not reported as unknown).
    """

    def __init__(self, tokens_per_block: int, window_size: int | None = None,
                 max_tracked_blocks: int = 1 << 22) -> None:
        if tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
        if window_size is not None and window_size <= 0:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.tokens_per_block = tokens_per_block
        self.window_size = window_size
        self.max_tracked_blocks = max_tracked_blocks
        self._ranks: dict[int | None, _RankState] = {}
        self.dropped: Counter[str] = Counter()
        self.malformed = 0

    def indexed_window(self, dp_rank: int | None = None) -> int | None:
        state = self._ranks.get(dp_rank)
        return None if state is None else state.window

    # -- public ------------------------------------------------------------------

    def translate(self, events: Iterable[object]) -> Translation:
        """Translate a drained list of event dicts. A malformed event is counted in
        Translation.malformed, logged and skipped; the others are translated."""
        out = Translation()
        for raw in events:
            try:
                self._translate_one(raw, out)
            except TrtllmEventError as exc:
                out.malformed += 1
                self.malformed += 1
                log.debug("trtllm kv event malformed error=%r", str(exc))
        self.dropped.update(out.dropped)
        return out

    def translate_event(self, raw: object) -> Translation:
        """Translate one event dict; TrtllmEventError (nothing changed) if malformed."""
        out = Translation()
        try:
            self._translate_one(raw, out)
        except TrtllmEventError:
            self.malformed += 1
            raise
        self.dropped.update(out.dropped)
        return out

    # -- one event (validate fully, then mutate) ----------------------------------

    def _translate_one(self, raw: object, out: Translation) -> None:
        event = _mapping(raw, "event")
        event_id = _opt_int(event.get("event_id"), "event_id", 0)
        window = _opt_int(event.get("window_size"), "window_size", 1)
        rank = _opt_int(event.get("attention_dp_rank"), "attention_dp_rank", 0)
        data = _mapping(event.get("data"), "data")
        kind = data.get("type")
        if not isinstance(kind, str):
            raise TrtllmEventError("data has no string 'type'")
        # Each branch validates the whole event before _begin changes any state.
        if kind == "created":
            levels = [_int(n, "num_blocks_per_cache_level[]", 0)
                      for n in _list(data.get("num_blocks_per_cache_level"),
                                     "num_blocks_per_cache_level")]
            if len(levels) > len(CACHE_LEVEL_TIERS):
                raise TrtllmEventError(
                    f"created event has {len(levels)} cache levels (at most "
                    f"{len(CACHE_LEVEL_TIERS)})"
                )
            state, group = self._begin(rank, event_id, out)
            for level_idx, num in enumerate(levels):
                out.capacity.append(
                    CapacityInfo(rank, window, level_idx, CACHE_LEVEL_TIERS[level_idx], num)
                )
            self._see_window(state, window, group, out)
        elif kind == "stored":
            parent_raw = data.get("parent_hash")
            parent = None if parent_raw is None else _hash(parent_raw, "parent_hash")
            blocks = [_parse_block(b, i) for i, b in enumerate(_list(data.get("blocks"), "blocks"))]
            for i, b in enumerate(blocks):
                if len(b.tokens) > self.tokens_per_block:
                    raise TrtllmEventError(
                        f"blocks[{i}] has {len(b.tokens)} tokens, more than tokens_per_block "
                        f"{self.tokens_per_block}"
                    )
            state, group = self._begin(rank, event_id, out)
            if self._see_window(state, window, group, out):
                self._stored(state, parent, blocks, group, out)
            else:
                out.dropped["other_window"] += 1
        elif kind == "removed":
            hashes = [_hash(h, "block_hashes[]")
                      for h in _list(data.get("block_hashes"), "block_hashes")]
            state, group = self._begin(rank, event_id, out)
            if self._see_window(state, window, group, out):
                self._removed(state, hashes, group, out)
            else:
                out.dropped["other_window"] += 1
        elif kind == "updated":
            if "block_hash" not in data:
                raise TrtllmEventError("updated event has no block_hash")
            block_hash = _hash(data["block_hash"], "block_hash")
            level = _parse_diff(data.get("cache_level"), "cache_level")
            if level is not None:
                cache_level_to_tier(level[0])
                cache_level_to_tier(level[1])
            priority = _parse_diff(data.get("priority"), "priority")
            state, group = self._begin(rank, event_id, out)
            if self._see_window(state, window, group, out):
                self._updated(state, block_hash, level, priority, group, out)
            else:
                out.dropped["other_window"] += 1
        else:
            self._begin(rank, event_id, out)
            out.dropped["unknown_event_type"] += 1

    def _begin(self, rank: int | None, event_id: int | None, out: Translation
               ) -> tuple[_RankState, RankEvents]:
        state = self._ranks.setdefault(rank, _RankState())
        if event_id is not None:
            if state.last_event_id is not None and event_id > state.last_event_id + 1:
                first = state.last_event_id + 1
                out.event_id_gaps.append(EventIdGap(rank, first, event_id - first))
            state.last_event_id = event_id
        return state, self._group(out, rank)

    def _group(self, out: Translation, rank: int | None) -> RankEvents:
        for group in out.groups:
            if group.dp_rank == rank:
                return group
        group = RankEvents(rank)
        out.groups.append(group)
        return group

    def _see_window(self, state: _RankState, window: int | None, group: RankEvents,
                    out: Translation) -> bool:
        """Whether events of `window` are indexed (choosing / switching the window)."""
        if window is None or window == state.window:
            return True
        if self.window_size is not None:
            if window != self.window_size:
                return False
            state.window = window
            return True
        if state.window is not None and window < state.window:
            return False
        if state.window is not None and state.indexed_any:
            # A larger window after a smaller one was indexed: start that rank over.
            group.events.append(AllCleared())
            state.known.clear()
            state.unindexed.clear()
            out.dropped["window_switch"] += 1
            log.debug("trtllm kv window switch old=%s new=%s", state.window, window)
        state.window = window
        return True

    # -- kinds -------------------------------------------------------------------

    def _stored(self, state: _RankState, parent: int | None, blocks: list[_ParsedBlock],
                group: RankEvents, out: Translation) -> None:
        bs = self.tokens_per_block
        run: list[_ParsedBlock] = []
        run_parent = parent

        def flush() -> None:
            if not run:
                return
            tokens = tuple(t for b in run for t in b.tokens)
            first = run[0]
            group.events.append(BlockStored(
                hashes=tuple(b.hash for b in run), parent=run_parent, token_ids=tokens,
                block_size=bs, tier=first.tier, extra_key=first.extra_key))
            prev = run_parent
            for b in run:
                self._remember(state, b.hash, _Known(prev, array("I", b.tokens).tobytes(),
                                                     b.extra_key, b.tier))
                prev = b.hash
            state.indexed_any = True

        prev_hash = parent
        for i, block in enumerate(blocks):
            if len(block.tokens) < bs or not block.plain:
                reason = "partial_block" if len(block.tokens) < bs else "non_text_block"
                # This block and every later one in the chain cannot be indexed.
                flush()
                for rest in blocks[i:]:
                    self._mark_unindexed(state, rest.hash)
                out.dropped[reason] += 1
                if len(blocks) - i - 1:
                    out.dropped["after_unindexed_block"] += len(blocks) - i - 1
                return
            if run and (block.tier != run[0].tier or block.extra_key != run[0].extra_key):
                flush()
                run = []
                run_parent = prev_hash
            run.append(block)
            prev_hash = block.hash
        flush()

    def _removed(self, state: _RankState, hashes: list[int], group: RankEvents,
                 out: Translation) -> None:
        run: list[int] = []
        run_tier = Tier.GPU
        for h in hashes:
            if h in state.unindexed:
                state.unindexed.discard(h)
                out.dropped["unindexed_removed"] += 1
                continue
            known = state.known.pop(h, None)
            tier = Tier.GPU if known is None else known.tier
            if run and tier != run_tier:
                group.events.append(BlockRemoved(tuple(run), run_tier))
                run = []
            run_tier = tier
            run.append(h)
        if run:
            group.events.append(BlockRemoved(tuple(run), run_tier))

    def _updated(self, state: _RankState, block_hash: int, level: tuple[int, int] | None,
                 priority: tuple[int, int] | None, group: RankEvents, out: Translation) -> None:
        if priority is not None and priority[0] != priority[1]:
            out.dropped["priority_update"] += 1
        if level is None or level[0] == level[1]:
            return
        if block_hash in state.unindexed:
            out.dropped["unindexed_update"] += 1
            return
        old, new = CACHE_LEVEL_TIERS[level[0]], CACHE_LEVEL_TIERS[level[1]]
        known = state.known.get(block_hash)
        if known is None:
            out.dropped["tier_move_without_tokens"] += 1
            group.events.append(BlockRemoved((block_hash,), old))
            return
        tokens = array("I")
        tokens.frombytes(known.tokens)
        group.events.append(BlockStored(
            hashes=(block_hash,), parent=known.parent, token_ids=tuple(tokens),
            block_size=self.tokens_per_block, tier=new, extra_key=known.extra_key))
        group.events.append(BlockRemoved((block_hash,), old))
        known.tier = new

    # -- bookkeeping ---------------------------------------------------------------

    def _remember(self, state: _RankState, h: int, known: _Known) -> None:
        state.unindexed.discard(h)
        if len(state.known) >= self.max_tracked_blocks and h not in state.known:
            # Memory guard: a removal stream that never arrives must not grow us forever.
            # Forgetting only costs a tier move falling back to removal.
            state.known.pop(next(iter(state.known)))
            self.dropped["tracked_blocks_evicted"] += 1
        state.known[h] = known

    def _mark_unindexed(self, state: _RankState, h: int) -> None:
        if h in state.known:
            return  # already indexed from an earlier full store of the same block
        if len(state.unindexed) >= self.max_tracked_blocks:
            state.unindexed.pop()
        state.unindexed.add(h)
