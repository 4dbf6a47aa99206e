"""Typed stub for the Rust extension `kvrouter._core` (rust/src/python/)."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
from typing_extensions import Buffer

TokenInput = Sequence[int] | Buffer | np.ndarray
"""list/tuple of ints, array('I'), a numpy integer array (any int dtype, values
checked to fit u32) or bytes/bytearray/memoryview of little-endian u32 ids."""

TierName = Literal["gpu", "host", "disk"]
PolicyName = Literal["kv", "prefix_only", "least_loaded", "round_robin", "random"]

HASH_SEED: int
"""Seed of the local block hash (xxh3-64)."""

def hash_blocks(
    tokens: TokenInput, block_size: int, extra_key: bytes | str | None = None
) -> list[int]:
    """Router sequence hashes of the full blocks of `tokens` (DESIGN §3.1)."""

def local_block_hash(tokens: TokenInput) -> int:
    """xxh3-64 of one block's token ids as little-endian u32, with HASH_SEED."""

def decode_payload(payload: bytes) -> list[tuple[object, ...]]:
    """Decode a kvrouter event payload (kvrouter.events.codec) into tuples:
    ("stored", hashes, parent, tokens_bytes|None, block_size, router_hashes|None, tier, extra_key|None),
    ("removed", hashes, tier), ("cleared",). Raises ValueError on malformed input."""

class ApplyResult:
    stored_blocks: int
    duplicate_blocks: int
    removed_blocks: int
    unknown_removals: int
    orphan_events: int
    cleared_blocks: int
    malformed: int
    mismatched_events: int
    """Stored events whose engine block size is not a multiple of the index's."""
    error: str | None
    """Why a payload was rejected (malformed), if it was."""
    def as_dict(self) -> dict[str, int]: ...

class PrefixIndex:
    """Which workers hold which blocks, for one model. Thread-safe; long calls release the GIL."""

    block_size: int
    def __init__(self, block_size: int) -> None: ...
    def apply_stored(
        self,
        worker: int,
        hashes: Sequence[int],
        parent: int | None = None,
        token_ids: TokenInput | None = None,
        router_hashes: Sequence[int] | None = None,
        tier: TierName = "gpu",
        extra_key: bytes | str | None = None,
        engine_block_size: int | None = None,
    ) -> ApplyResult:
        """Store blocks. token_ids are re-hashed with the router's hash; an engine
        block that is k router blocks long (engine_block_size = k * block_size) is split.
        An unknown parent is reported (orphan_events=1) and nothing is applied."""

    def apply_removed(self, worker: int, hashes: Sequence[int], tier: TierName = "gpu") -> ApplyResult: ...
    def clear_worker(self, worker: int) -> ApplyResult: ...
    def remove_worker(self, worker: int) -> int: ...
    def apply_payload(self, worker: int, payload: bytes) -> ApplyResult:
        """Decode one stream payload and apply its events in order. A malformed payload
        changes nothing and is reported with malformed=1."""

    def apply_payloads(self, batch: Sequence[tuple[int, bytes]]) -> list[ApplyResult]: ...
    def find_matches(self, router_hashes: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        """Per worker: blocks of the contiguous matched prefix, split by the best tier
        holding each block (gpu, host, disk). Workers with no match are absent."""

    def find_matches_tokens(
        self, tokens: TokenInput, extra_key: bytes | str | None = None
    ) -> dict[int, tuple[int, int, int]]: ...
    def find_matches_batch(
        self, queries: Sequence[Sequence[int]]
    ) -> list[dict[int, tuple[int, int, int]]]: ...
    def workers(self) -> list[int]: ...
    def blocks_per_worker(self) -> dict[int, int]: ...
    def worker_blocks(self, worker: int) -> int: ...
    def worker_router_hashes(self, worker: int) -> list[tuple[int, int]]:
        """(router hash, tier bitmask) of every block the worker holds."""

    def worker_engine_hashes(self, worker: int) -> list[int]: ...
    def num_nodes(self) -> int: ...
    def num_entries(self) -> int:
        """(worker, block) pairs held."""

    def memory_bytes(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def snapshot(self) -> bytes: ...
    @staticmethod
    def from_snapshot(data: bytes) -> PrefixIndex: ...
    def load_snapshot(self, data: bytes, worker_map: dict[int, int] | None = None) -> None:
        """Replace this index's contents with a snapshot (unchanged on error). worker_map
        renames the snapshot's worker ids (the writer's registry) to this reader's ids;
        every snapshot worker must be mapped."""

class Candidate:
    worker: int
    gpu_blocks: int
    host_blocks: int
    disk_blocks: int
    new_prefill_tokens: int
    decode_blocks: int
    queue: int
    cost: float

class Decision:
    worker: int
    overlap_blocks: int
    """Matched prefix blocks on the chosen worker (all tiers)."""
    gpu_blocks: int
    prompt_blocks: int
    prompt_tokens: int
    request_id: str | None
    policy: str
    candidates: list[Candidate]
    """Filled when explain=True."""

class WorkerLoad:
    worker: int
    routable: bool
    reserved_prefill_tokens: int
    reserved_decode_blocks: int
    reserved_requests: int
    waiting_requests: int
    reported_running: int
    reported_queued: int
    reported_kv_used_blocks: int
    reported_kv_free_blocks: int
    external_prefill_tokens: int
    external_decode_blocks: int
    external_requests: int
    prefill_tokens: int
    decode_blocks: int
    queue: int

class Scheduler:
    """Scores workers for one model (DESIGN §3.3) and accounts the load it creates.

    One scoring path: the gRPC service, the fleet simulator and the benchmarks all
    call route() here. Times are seconds; pass `now` for simulated time, else a
    monotonic clock is used."""

    def __init__(
        self,
        index: PrefixIndex,
        policy: PolicyName = "kv",
        prefill_weight: float = 1.0,
        decode_weight: float = 0.25,
        queue_weight: float = 0.0,
        queued_prefill_weight: float | None = None,
        temperature: float = 0.0,
        host_credit: float = 0.5,
        disk_credit: float = 0.25,
        lease_s: float = 300.0,
        report_ttl_s: float = 5.0,
        seed: int | None = None,
    ) -> None: ...
    policy: str
    def configure(
        self,
        policy: PolicyName | None = None,
        prefill_weight: float | None = None,
        decode_weight: float | None = None,
        queue_weight: float | None = None,
        queued_prefill_weight: float | None = None,
        temperature: float | None = None,
        host_credit: float | None = None,
        disk_credit: float | None = None,
        lease_s: float | None = None,
        report_ttl_s: float | None = None,
    ) -> None: ...
    def add_worker(self, worker: int) -> None: ...
    def remove_worker(self, worker: int) -> list[str]:
        """Forget the worker and its reservations (returned request ids); the index is left to the caller."""

    def set_routable(self, worker: int, routable: bool) -> None: ...
    def workers(self) -> list[int]: ...
    def route(
        self,
        tokens: TokenInput,
        extra_key: bytes | str | None = None,
        request_id: str | None = None,
        expected_output_tokens: int = 0,
        candidates: Sequence[int] | None = None,
        policy: PolicyName | None = None,
        explain: bool = False,
        reserve: bool = True,
        now: float | None = None,
        prefill_weight: float | None = None,
    ) -> Decision:
        """Hash, match, score and (when reserve and request_id) reserve. ValueError if
        there is no routable candidate or the input is bad. prefill_weight overrides the
        configured one for this call only."""

    def route_hashes(
        self,
        router_hashes: Sequence[int],
        prompt_tokens: int,
        request_id: str | None = None,
        expected_output_tokens: int = 0,
        candidates: Sequence[int] | None = None,
        policy: PolicyName | None = None,
        explain: bool = False,
        reserve: bool = True,
        now: float | None = None,
        prefill_weight: float | None = None,
    ) -> Decision: ...
    def reserve(
        self,
        worker: int,
        request_id: str,
        prefill_tokens: int,
        decode_blocks: int,
        now: float | None = None,
    ) -> None: ...
    def mark_prefill_done(self, request_id: str, now: float | None = None) -> bool: ...
    def release(self, request_id: str) -> bool: ...
    def has_reservation(self, request_id: str) -> bool: ...
    def expire(self, now: float | None = None) -> list[str]: ...
    def report_load(
        self,
        worker: int,
        running: int,
        queued: int,
        kv_used_blocks: int,
        kv_free_blocks: int,
        queued_prefill_tokens: int = 0,
        now: float | None = None,
    ) -> None: ...
    def set_external_load(
        self, worker: int, prefill_tokens: int, decode_blocks: int, requests: int
    ) -> None:
        """In-flight load other router replicas reserved on this worker."""

    def load(self, worker: int, now: float | None = None) -> WorkerLoad: ...
    def loads(self, now: float | None = None) -> list[WorkerLoad]: ...
    def now(self) -> float: ...
