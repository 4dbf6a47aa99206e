"""An adapter's copy of the blocks its engine holds, to answer routers' full dumps.

Engines publish changes, not state; a router that lost track of a worker (it
restarted, or a gap cost it events) asks for the worker's whole block set. The
vLLM / SGLang bridge and the TensorRT-LLM worker keep a BlockMirror fed with the
events they publish and answer from it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, Tier


@dataclass(slots=True)
class _Held:
    parent: int | None
    tokens: bytes  # array('I') bytes of the block's token ids: compact
    block_size: int
    extra_key: bytes | None


class BlockMirror:
    """The blocks an engine holds, rebuilt from its events, to answer full dumps.

    Keyed by (engine hash, tier) like the router's index. `dump()` returns
    BlockStored events with every parent before its children; a block whose
    parent is no longer held (its chain was cut by an eviction) is left out,
    as the router could not place it either.
    """

    def __init__(self, max_blocks: int = 1 << 21) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be > 0")
        self.max_blocks = max_blocks
        self._blocks: dict[tuple[int, Tier], _Held] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def clear(self) -> None:
        self._blocks.clear()

    def apply(self, events: Iterable[KvEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(ev)
            elif isinstance(ev, BlockRemoved):
                tier = Tier(ev.tier)
                for h in ev.hashes:
                    self._blocks.pop((h, tier), None)
            elif isinstance(ev, AllCleared):
                self._blocks.clear()

    def _stored(self, ev: BlockStored) -> None:
        if ev.token_ids is None:
            return  # router-hash-only events (simulator) never come through a bridge
        bs = ev.block_size
        tier = Tier(ev.tier)
        tokens = array("I", ev.token_ids)
        parent = ev.parent
        for i, h in enumerate(ev.hashes):
            key = (h, tier)
            self._blocks.pop(key, None)  # re-insert at the end: insertion order stays causal
            if len(self._blocks) >= self.max_blocks:
                # Guard against a removal stream that never comes: forget the oldest.
                self._blocks.pop(next(iter(self._blocks)))
                self.evicted += 1
            self._blocks[key] = _Held(parent, tokens[i * bs:(i + 1) * bs].tobytes(), bs,
                                      ev.extra_key)
            parent = h

    def dump(self) -> list[KvEvent]:
        """The held blocks as BlockStored events, parents first, chains merged."""
        children: dict[int | None, list[tuple[int, Tier]]] = {}
        held_hashes = {h for h, _ in self._blocks}
        for key, b in self._blocks.items():
            if b.parent is None or b.parent in held_hashes:
                children.setdefault(b.parent, []).append(key)
        order: list[tuple[int, Tier]] = []
        seen: set[tuple[int, Tier]] = set()
        stack = list(reversed(children.get(None, [])))
        while stack:  # iterative DFS: preorder keeps each chain contiguous
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            order.append(key)
            stack.extend(reversed(children.get(key[0], [])))
        out: list[KvEvent] = []
        run: list[tuple[int, Tier]] = []

        def flush() -> None:
            if not run:
                return
            first = self._blocks[run[0]]
            tokens = array("I")
            for k in run:
                tokens.frombytes(self._blocks[k].tokens)
            out.append(BlockStored(hashes=tuple(k[0] for k in run), parent=first.parent,
                                   token_ids=tuple(tokens), block_size=first.block_size,
                                   tier=run[0][1], extra_key=first.extra_key))
            run.clear()

        for key in order:
            b = self._blocks[key]
            if run:
                prev_key = run[-1]
                prev = self._blocks[prev_key]
                if not (b.parent == prev_key[0] and key[1] == prev_key[1]
                        and b.block_size == prev.block_size and b.extra_key == prev.extra_key):
                    flush()
            run.append(key)
        flush()
        return out
