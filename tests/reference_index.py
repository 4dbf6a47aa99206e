"""A deliberately simple pure-Python model of the prefix index, for property tests.

It follows docs/design.md §3.1 literally (hashes via the reference xxhash package) and
keeps plain dicts and sets, so it is easy to trust and slow."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import xxhash

from kvrouter import HASH_SEED

TIERS = ("gpu", "host", "disk")


def root(extra_key: bytes | None) -> int:
    if extra_key:
        return xxhash.xxh3_64_intdigest(extra_key, seed=HASH_SEED ^ 0x6578_7472_616B_6579)
    return 0


def chain(parent: int, tokens: list[int]) -> int:
    local = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed=HASH_SEED)
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, local), seed=HASH_SEED)


def spec_hash_blocks(tokens: list[int], block_size: int, extra_key: bytes | None = None) -> list[int]:
    parent, out = root(extra_key), []
    for i in range(len(tokens) // block_size):
        parent = chain(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


@dataclass
class RefWorker:
    engine: dict[int, list[int]] = field(default_factory=dict)  # engine hash -> router hashes
    tiers: dict[int, set[str]] = field(default_factory=dict)  # router hash -> tiers held


class RefIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.workers: dict[int, RefWorker] = {}
        self.orphans = 0

    def stored(self, worker: int, hashes: list[int], parent: int | None, tokens: list[int],
               engine_block_size: int, tier: str, extra_key: bytes | None) -> str:
        w = self.workers.get(worker)
        if engine_block_size % self.block_size:
            return "mismatch"
        if parent is None:
            prev = root(extra_key)
        elif w is not None and parent in w.engine:
            prev = w.engine[parent][-1]
        else:
            self.orphans += 1
            return "orphan"
        w = self.workers.setdefault(worker, RefWorker())
        k = engine_block_size // self.block_size
        bs = self.block_size
        for i, eh in enumerate(hashes):
            group = []
            for j in range(k):
                start = (i * k + j) * bs
                prev = chain(prev, tokens[start : start + bs])
                group.append(prev)
            old = w.engine.get(eh)
            if old is not None and old[-1] != group[-1]:
                for r in old:
                    w.tiers.pop(r, None)
            for r in group:
                w.tiers.setdefault(r, set()).add(tier)
            w.engine[eh] = group
        return "ok"

    def removed(self, worker: int, hashes: list[int], tier: str) -> None:
        w = self.workers.get(worker)
        if w is None:
            return
        for eh in hashes:
            group = w.engine.get(eh)
            if group is None:
                continue
            gone = True
            for r in group:
                held = w.tiers.get(r)
                if held is None:
                    continue
                held.discard(tier)
                if held:
                    gone = False
                else:
                    del w.tiers[r]
            if gone:
                del w.engine[eh]

    def cleared(self, worker: int) -> None:
        if worker in self.workers:
            self.workers[worker] = RefWorker()

    def remove_worker(self, worker: int) -> None:
        self.workers.pop(worker, None)

    def find_matches(self, hashes: list[int]) -> dict[int, tuple[int, int, int]]:
        out = {}
        for wid, w in self.workers.items():
            counts = [0, 0, 0]
            for h in hashes:
                held = w.tiers.get(h)
                if not held:
                    break
                counts[min(TIERS.index(t) for t in held)] += 1
            if sum(counts):
                out[wid] = (counts[0], counts[1], counts[2])
        return out

    def blocks_per_worker(self) -> dict[int, int]:
        return {wid: len(w.tiers) for wid, w in self.workers.items()}

    def router_hashes(self, worker: int) -> list[tuple[int, int]]:
        w = self.workers.get(worker)
        if w is None:
            return []
        return sorted((r, sum(1 << TIERS.index(t) for t in held)) for r, held in w.tiers.items())
