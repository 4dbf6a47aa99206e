"""Paged KV cache of the simulated engine: prefix reuse, LRU eviction, KV events.

Blocks come in two kinds:

* cached blocks: full prompt blocks identified by their sequence hash. They are
  reusable by any later request with the same prefix, carry a reference count,
  and when no request references them they sit in an LRU list and may be
  evicted. Storing one emits ``BlockStored``; evicting one emits ``BlockRemoved``.
* anonymous blocks: the partial last prompt block and blocks filled by decoding.
  They belong to one request and are freed with it; they never match another
  request (their contents are not known to the router), so they emit nothing.

The sequence hashes the simulator uses are the router's own hashes (the engine
hash is the router hash), so a ``BlockStored`` carries both.

Requests always hold a whole prefix, and release their blocks tail first, so
an unreferenced block is never older in the LRU than its descendants: the cache
stays prefix-closed (a parent is never evicted before its children), and every
stored event's parent is present.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent


class CacheFull(RuntimeError):
    """Not enough free or evictable blocks for an allocation."""


class PagedKvCache:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs: dict[int, int] = {}  # cached block hash -> reference count
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced, oldest first
        self._anon = 0  # anonymous blocks in use
        # Chain links of cached blocks, so that `discard` (host offload) never frees a block
        # another cached block hangs under (the cache stays prefix-closed).
        self._parent: dict[int, int | None] = {}
        self._kids: dict[int, int] = {}
        self.events: list[KvEvent] = []
        self.stored_blocks = 0
        self.evicted_blocks = 0

    # -- views ------------------------------------------------------------------
    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    @property
    def free_blocks(self) -> int:
        """Blocks holding nothing."""
        return self.num_blocks - len(self._refs) - self._anon

    @property
    def evictable_blocks(self) -> int:
        return len(self._lru)

    @property
    def available_blocks(self) -> int:
        """Blocks an allocation can get: free plus evictable."""
        return self.free_blocks + len(self._lru)

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by running requests (cached and anonymous)."""
        return len(self._refs) - len(self._lru) + self._anon

    def contains(self, block_hash: int) -> bool:
        return block_hash in self._refs

    def hashes(self) -> set[int]:
        return set(self._refs)

    def ref_count(self, block_hash: int) -> int:
        return self._refs.get(block_hash, 0)

    def match_prefix(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` held in the cache (referenced or not)."""
        n = 0
        refs = self._refs
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    # -- mutation ---------------------------------------------------------------
    def acquire(self, hashes: Sequence[int]) -> None:
        """Reference cached blocks (a matched prefix). All must be present."""
        refs, lru = self._refs, self._lru
        for h in hashes:
            c = refs[h]
            if c == 0:
                del lru[h]
            refs[h] = c + 1

    def allocate(self, n: int) -> None:
        """Take n anonymous blocks, evicting least recently used unreferenced blocks."""
        if n <= 0:
            return
        if n > self.available_blocks:
            raise CacheFull(f"need {n} blocks, {self.available_blocks} available")
        short = n - self.free_blocks
        if short > 0:
            self._evict(short)
        self._anon += n

    def free_anonymous(self, n: int) -> None:
        if n < 0 or n > self._anon:
            raise ValueError(f"cannot free {n} anonymous blocks, {self._anon} in use")
        self._anon -= n

    def commit(self, hashes: Sequence[int], parent: int | None) -> None:
        """Turn len(hashes) of the caller's anonymous blocks into cached blocks.

        `parent` is the hash before hashes[0] (None at the prompt start). A hash
        already cached (another request computed the same block first) is shared
        instead and the caller's copy is freed; only new blocks are announced.
        """
        if len(hashes) > self._anon:
            raise ValueError("commit of more blocks than are allocated")
        refs, lru = self._refs, self._lru
        run: list[int] = []
        run_parent = parent
        prev = parent
        for h in hashes:
            c = refs.get(h)
            if c is None:
                refs[h] = 1
                self._link(h, prev)
                if not run:
                    run_parent = prev
                run.append(h)
            else:
                if c == 0:
                    del lru[h]
                refs[h] = c + 1  # shared; our own copy goes back to the free pool below
                if run:
                    self._emit_stored(run, run_parent)
                    run = []
            prev = h
        if run:
            self._emit_stored(run, run_parent)
        # every committed block leaves the anonymous pool: new ones became cached,
        # duplicates were freed
        self._anon -= len(hashes)

    def release(self, hashes: Sequence[int]) -> None:
        """Drop one reference from each block of a held prefix; tail first into the LRU,
        so a prefix's tail is evicted before its head."""
        refs, lru = self._refs, self._lru
        for h in reversed(hashes):
            c = refs[h] - 1
            refs[h] = c
            if c == 0:
                lru[h] = None

    def clear(self) -> None:
        """Drop every unreferenced block at once (e.g. a cache reset) and announce it."""
        if self._refs and len(self._lru) == len(self._refs):
            self._refs.clear()
            self._lru.clear()
            self._parent.clear()
            self._kids.clear()
            self.events.append(AllCleared())
        else:
            self._evict(len(self._lru))

    def discard(self, hashes: Sequence[int]) -> tuple[int, ...]:
        """Free the unreferenced tail of a held chain (e.g. after copying it to host memory):
        tail first, stopping at the first block that is referenced or that another cached
        block hangs under. Announces the freed blocks; returns them."""
        refs, lru, kids = self._refs, self._lru, self._kids
        gone: list[int] = []
        for h in reversed(hashes):
            if refs.get(h) != 0 or kids.get(h, 0):
                break
            del lru[h]
            del refs[h]
            self._unlink(h)
            gone.append(h)
        if gone:
            self.events.append(BlockRemoved(hashes=tuple(gone)))
            self.evicted_blocks += len(gone)
        return tuple(gone)

    def drain_events(self) -> list[KvEvent]:
        out, self.events = self.events, []
        return out

    def _emit_stored(self, run: list[int], parent: int | None) -> None:
        t = tuple(run)
        self.events.append(BlockStored(hashes=t, parent=parent, router_hashes=t))
        self.stored_blocks += len(t)

    def _evict(self, n: int) -> None:
        refs, lru = self._refs, self._lru
        gone: list[int] = []
        for _ in range(n):
            h, _none = lru.popitem(last=False)
            del refs[h]
            self._unlink(h)
            gone.append(h)
        if gone:
            self.events.append(BlockRemoved(hashes=tuple(gone)))
            self.evicted_blocks += len(gone)

    def _link(self, h: int, parent: int | None) -> None:
        self._parent[h] = parent
        if parent is not None:
            self._kids[parent] = self._kids.get(parent, 0) + 1

    def _unlink(self, h: int) -> None:
        parent = self._parent.pop(h, None)
        if parent is not None:
            c = self._kids.get(parent, 0) - 1
            if c > 0:
                self._kids[parent] = c
            else:
                self._kids.pop(parent, None)
