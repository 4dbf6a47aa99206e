"""A synthetic worker KV cache that emits real events (tests and bench/events.py).

`SyntheticCache` keeps a block tree the way a paged-attention engine does:
stores extend an existing cached prefix (or start a new one) by a few blocks,
evictions remove leaves. Every change is returned as the KV events an engine
adapter would publish, `dump()` returns the current set as events (parents
first), and `router_hashes()` is the set a correct router index must hold for
this worker — computed with the router's own hash function for token-carrying
events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvrouter.events.model import BlockRemoved, BlockStored, KvEvent


@dataclass
class _Block:
    engine_hash: int
    parent: int | None
    tokens: tuple[int, ...]
    router_hash: int
    children: set[int] = field(default_factory=set)


class SyntheticCache:
    def __init__(self, block_size: int, seed: int = 0, *, with_tokens: bool = True,
                 max_blocks: int = 2000, max_run: int = 8, vocab: int = 32000) -> None:
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.with_tokens = with_tokens
        self.max_blocks = max_blocks
        self.max_run = max_run
        self.vocab = vocab
        self.blocks: dict[int, _Block] = {}
        self.roots: set[int] = set()
        self.leaves: set[int] = set()

    def _new_hash(self) -> int:
        while True:
            h = self.rng.getrandbits(64)
            if h and h not in self.blocks:
                return h

    def _prefix_tokens(self, eh: int | None) -> list[int]:
        chain: list[tuple[int, ...]] = []
        while eh is not None:
            b = self.blocks[eh]
            chain.append(b.tokens)
            eh = b.parent
        out: list[int] = []
        for toks in reversed(chain):
            out.extend(toks)
        return out

    def store(self, n: int | None = None) -> list[KvEvent]:
        n = n or self.rng.randint(1, self.max_run)
        parent: int | None = None
        if self.blocks and self.rng.random() < 0.7:
            parent = self.rng.choice(list(self.leaves) if self.rng.random() < 0.5 else list(self.blocks))
        hashes = [self._new_hash() for _ in range(n)]
        tokens = [self.rng.randrange(self.vocab) for _ in range(n * self.block_size)]
        if self.with_tokens:
            from kvrouter._core import hash_blocks

            rh = hash_blocks(self._prefix_tokens(parent) + tokens, self.block_size)[-n:]
        else:
            rh = [self.rng.getrandbits(64) for _ in range(n)]
        prev = parent
        for i, h in enumerate(hashes):
            b = _Block(h, prev, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]), rh[i])
            self.blocks[h] = b
            if prev is None:
                self.roots.add(h)
            else:
                self.blocks[prev].children.add(h)
                self.leaves.discard(prev)
            prev = h
        self.leaves.add(hashes[-1])
        ev = BlockStored(hashes=tuple(hashes), parent=parent,
                         token_ids=tuple(tokens) if self.with_tokens else None,
                         block_size=self.block_size,
                         router_hashes=None if self.with_tokens else tuple(rh))
        return [ev]

    def evict(self, n: int | None = None) -> list[KvEvent]:
        n = n or self.rng.randint(1, self.max_run)
        gone: list[int] = []
        for _ in range(n):
            if not self.leaves:
                break
            h = self.rng.choice(list(self.leaves))
            self._remove_leaf(h)
            gone.append(h)
        return [BlockRemoved(hashes=tuple(gone))] if gone else []

    def _remove_leaf(self, h: int) -> None:
        b = self.blocks.pop(h)
        self.leaves.discard(h)
        self.roots.discard(h)
        if b.parent is not None:
            p = self.blocks[b.parent]
            p.children.discard(h)
            if not p.children:
                self.leaves.add(b.parent)

    def step(self) -> list[KvEvent]:
        """One random change: mostly stores, evictions when the cache is full."""
        if len(self.blocks) >= self.max_blocks or (self.blocks and self.rng.random() < 0.3):
            return self.evict()
        return self.store()

    def clear(self) -> None:
        self.blocks.clear()
        self.roots.clear()
        self.leaves.clear()

    def dump(self) -> list[KvEvent]:
        """The whole cache as BlockStored events, parents before children."""
        out: list[KvEvent] = []
        stack = sorted(self.roots)
        while stack:
            h = stack.pop()
            b = self.blocks[h]
            out.append(BlockStored(hashes=(h,), parent=b.parent,
                                   token_ids=b.tokens if self.with_tokens else None,
                                   block_size=self.block_size,
                                   router_hashes=None if self.with_tokens else (b.router_hash,)))
            stack.extend(sorted(b.children))
        return out

    def router_hashes(self) -> set[int]:
        return {b.router_hash for b in self.blocks.values()}
