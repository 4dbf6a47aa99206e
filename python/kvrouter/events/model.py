"""The router's own KV event model (docs/design.md §3.2).

Every engine adapter (sim, TensorRT-LLM, vLLM / SGLang bridges) translates its
engine's native events into these three types; the publisher batches them
into Redis stream entries and the router applies them to its index.

Engine hashes are opaque u64 values used only to apply removals and to find
a stored block's parent; matching uses the router's own hashes of the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Tier(IntEnum):
    """Where a cached block lives; higher tiers are slower to reuse."""

    GPU = 0
    HOST = 1
    DISK = 2

    @classmethod
    def parse(cls, value: str | int | Tier) -> Tier:
        """A tier from its number, its name or an engine's name for the medium."""
        if isinstance(value, Tier):
            return value
        if isinstance(value, int):
            return cls(value)
        tier = _MEDIA.get(value.strip().upper())
        if tier is None:
            raise ValueError(f"unknown storage tier {value!r} (expected gpu, host, disk or an "
                             "engine's name for one)")
        return tier

    @property
    def wire(self) -> str:
        return self.name.lower()


# Tier names and engines' names for the storage media (vLLM / SGLang `medium`): the one
# table of tier aliases.
_MEDIA: dict[str, Tier] = {
    **dict.fromkeys(("GPU", "CUDA", "DEVICE", "HBM", "NPU", "XPU", "TPU"), Tier.GPU),
    **dict.fromkeys(("CPU", "HOST", "DRAM", "MEMORY", "CPU_PINNED", "PINNED"), Tier.HOST),
    **dict.fromkeys(("DISK", "SSD", "NVME", "STORAGE", "LOCAL_DISK", "FILE", "FS"), Tier.DISK),
}


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks a worker now holds, chained under `parent` (None: prompt start).

    Either `token_ids` (block_size tokens per hash, flattened) or `router_hashes`
    (precomputed router sequence hashes, e.g. from the simulator) is set.
    """

    hashes: tuple[int, ...]
    parent: int | None = None
    token_ids: tuple[int, ...] | None = None
    block_size: int = 0
    router_hashes: tuple[int, ...] | None = None
    tier: Tier = Tier.GPU
    extra_key: bytes | None = None

    def __post_init__(self) -> None:
        if not self.hashes:
            raise ValueError("BlockStored needs at least one block hash")
        if self.token_ids is None and self.router_hashes is None:
            raise ValueError("BlockStored needs token_ids or router_hashes")
        if self.token_ids is not None:
            if self.block_size <= 0:
                raise ValueError("BlockStored with token_ids needs block_size > 0")
            if len(self.token_ids) != self.block_size * len(self.hashes):
                raise ValueError(
                    f"BlockStored has {len(self.token_ids)} token ids for {len(self.hashes)} "
                    f"blocks of {self.block_size}"
                )
        if self.router_hashes is not None and len(self.router_hashes) != len(self.hashes):
            raise ValueError("BlockStored router_hashes and hashes differ in length")


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    hashes: tuple[int, ...]
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class AllCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllCleared


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's own view of its load; corrects the router's reservations."""

    running: int = 0
    queued: int = 0
    kv_used_blocks: int = 0
    kv_free_blocks: int = 0
    queued_prefill_tokens: int = 0
    kv_capacity_blocks: int = 0  # GPU KV capacity (0: not reported; the pressure term is off)
    kv_cached_blocks: int = 0  # reusable cached blocks no running request uses (0: unknown)

