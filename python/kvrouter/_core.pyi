"""Typed stub for the Rust extension `kvrouter._core` (rust/src/python/)."""

from collections.abc import Sequence
from typing import ClassVar, Literal, Self, TypedDict, final

import numpy as np
from typing_extensions import Buffer

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_WEIGHTS",
    "HASH_SEED",
    "POLICIES",
    "ApplyResult",
    "Candidate",
    "Decision",
    "DuplicateRequest",
    "InvalidArgument",
    "KvrouterError",
    "MalformedPayload",
    "NoRoutableWorker",
    "Overlap",
    "PrefixIndex",
    "Scheduler",
    "SnapshotError",
    "UnknownPolicy",
    "UnknownWorker",
    "WorkerLoad",
    "decode_payload",
    "hash_blocks",
    "local_block_hash",
]

TokenInput = Sequence[int] | Buffer | np.ndarray
"""list/tuple of ints, array('I'), a numpy integer array (any int dtype, values
checked to fit u32) or bytes/bytearray/memoryview of little-endian u32 ids."""

TierName = Literal["gpu", "host", "disk"]
PolicyName = Literal["kv", "prefix_only", "least_loaded", "round_robin", "random"]

HASH_SEED: int
"""Seed of the local block hash (xxh3-64)."""

POLICIES: tuple[PolicyName, ...]
"""Every routing policy, in the core's order (rust/src/scoring.rs)."""

DEFAULT_POLICY: PolicyName
"""The policy a Scheduler uses when none is given."""

class _DefaultWeights(TypedDict):
    prefill_weight: float
    decode_weight: float
    queue_weight: float
    queued_prefill_weight: float
    pressure_weight: float
    temperature: float
    host_credit: float
    disk_credit: float
    lease_s: float
    report_ttl_s: float
    approx_ttl_s: float
    pending_ttl_s: float

DEFAULT_WEIGHTS: _DefaultWeights
"""The default of every numeric Scheduler setting, by its keyword, from the core
(rust/src/scoring.rs, rust/src/scheduler.rs): the one definition config, the fleet
simulator and the benches read."""

class KvrouterError(Exception):
    """Base of every error the kvrouter core raises."""

class UnknownWorker(KvrouterError, KeyError, ValueError):
    """The worker is not registered (set_routable, reserve, report_load, set_external_load, load)."""

class NoRoutableWorker(KvrouterError, ValueError):
    """No candidate worker is registered and routable for the request (route, route_hashes)."""

class InvalidArgument(KvrouterError, ValueError):
    """An argument or an event is out of range or inconsistent."""

class UnknownPolicy(InvalidArgument):
    """The policy name is not one of POLICIES."""

class DuplicateRequest(InvalidArgument):
    """The request id already holds a reservation."""

class MalformedPayload(InvalidArgument):
    """An event payload that does not decode (decode_payload)."""

class SnapshotError(KvrouterError, ValueError):
    """A snapshot is corrupt, truncated, of another version or does not fit this index."""

def hash_blocks(
    tokens: TokenInput, block_size: int, extra_key: bytes | str | None = None
) -> list[int]:
    """Router sequence hashes of the full blocks of `tokens` (docs/design.md §3.1)."""

def local_block_hash(tokens: TokenInput) -> int:
    """xxh3-64 of one block's token ids as little-endian u32, with HASH_SEED."""

def decode_payload(payload: bytes) -> list[tuple[object, ...]]:
    """Decode a kvrouter event payload (kvrouter.events.codec) into tuples:
    ("stored", hashes, parent, tokens_bytes|None, block_size, router_hashes|None, tier, extra_key|None),
    ("removed", hashes, tier), ("cleared",). Raises MalformedPayload on malformed input."""

@final
class ApplyResult:
    """Counters of one apply call (rust/src/index.rs)."""

    FIELDS: ClassVar[tuple[str, ...]]
    """The counter names, in order: fold results by these, never by a re-typed list."""
    @property
    def stored_blocks(self) -> int: ...
    @property
    def duplicate_blocks(self) -> int: ...
    @property
    def removed_blocks(self) -> int: ...
    @property
    def unknown_removals(self) -> int: ...
    @property
    def orphan_events(self) -> int: ...
    @property
    def cleared_blocks(self) -> int: ...
    @property
    def malformed(self) -> int: ...
    @property
    def mismatched_events(self) -> int:
        """Stored events whose engine block size is not a multiple of the index's."""
    @property
    def error(self) -> str | None:
        """Why a payload was rejected (malformed), if it was."""
    def as_dict(self) -> dict[str, int]:
        """The counters by name (FIELDS), without `error`."""

@final
class Overlap:
    """Matched prefix blocks on one worker, by the best tier holding each block."""

    @property
    def gpu(self) -> int: ...
    @property
    def host(self) -> int: ...
    @property
    def disk(self) -> int: ...
    @property
    def blocks(self) -> int:
        """All tiers together."""

@final
class PrefixIndex:
    """Which workers hold which blocks, for one model. Thread-safe; long calls release the GIL."""

    @property
    def block_size(self) -> int: ...
    def __new__(cls, block_size: int) -> Self: ...
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

@final
class Candidate:
    """One scored worker (Decision.candidates with explain=True)."""

    @property
    def worker(self) -> int: ...
    @property
    def overlap(self) -> Overlap: ...
    @property
    def gpu_blocks(self) -> int: ...
    @property
    def host_blocks(self) -> int: ...
    @property
    def disk_blocks(self) -> int: ...
    @property
    def new_prefill_tokens(self) -> int: ...
    @property
    def decode_blocks(self) -> int: ...
    @property
    def queue(self) -> int: ...
    @property
    def evicted_blocks(self) -> int:
        """Cached blocks the request would evict on the worker (0: no capacity or room left)."""
    @property
    def pressure_cost(self) -> float:
        """What those evictions add to cost (kv policy only)."""
    @property
    def pending_blocks(self) -> int:
        """Leading prompt blocks in flight to the worker: routed (reserved) there, not yet
        prefilled; counted in the GPU overlap (docs/design.md §3.3)."""
    @property
    def cost(self) -> float: ...

@final
class Decision:
    @property
    def worker(self) -> int: ...
    @property
    def overlap_blocks(self) -> int:
        """Matched prefix blocks on the chosen worker (all tiers)."""
    @property
    def gpu_blocks(self) -> int: ...
    @property
    def host_blocks(self) -> int: ...
    @property
    def disk_blocks(self) -> int: ...
    @property
    def prompt_blocks(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def policy(self) -> str: ...
    @property
    def candidates(self) -> list[Candidate]:
        """Filled when explain=True."""

@final
class WorkerLoad:
    """One worker's load at one instant (rust/src/load.rs)."""

    @property
    def worker(self) -> int: ...
    @property
    def routable(self) -> bool: ...
    @property
    def reserved_prefill_tokens(self) -> int: ...
    @property
    def reserved_decode_blocks(self) -> int: ...
    @property
    def reserved_requests(self) -> int: ...
    @property
    def waiting_requests(self) -> int: ...
    @property
    def reported_running(self) -> int: ...
    @property
    def reported_queued(self) -> int: ...
    @property
    def reported_kv_used_blocks(self) -> int: ...
    @property
    def reported_kv_free_blocks(self) -> int: ...
    @property
    def external_prefill_tokens(self) -> int: ...
    @property
    def external_decode_blocks(self) -> int: ...
    @property
    def reported_kv_cached_blocks(self) -> int: ...
    @property
    def kv_capacity_blocks(self) -> int:
        """The capacity the cache-pressure term uses (0: off for this worker)."""
    @property
    def approx(self) -> bool:
        """Approximate mode: the cache is predicted from this scheduler's decisions."""
    @property
    def reuse(self) -> float:
        """Likelihood that a block the worker evicts would be reused (share of its recent GPU
        evictions that prompts routed to it asked for again; 1/4 before any), in [0, 1]."""
    @property
    def external_requests(self) -> int: ...
    @property
    def prefill_tokens(self) -> int:
        """The scorer's view: reservations + fresh report drift + external load."""
    @property
    def decode_blocks(self) -> int: ...
    @property
    def queue(self) -> int: ...

@final
class Scheduler:
    """Scores workers for one model (docs/design.md §3.3) and accounts the load it creates.

    One scoring path: the gRPC service, the fleet simulator and the benchmarks all
    call route() here. Times are seconds; pass `now` for simulated time, else a
    monotonic clock is used."""

    def __new__(
        cls,
        index: PrefixIndex,
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
        seed: int | None = None,
        pressure_weight: float | None = None,
        approx_ttl_s: float | None = None,
        pending_ttl_s: float | None = None,
    ) -> Self:
        """A setting left out (None) takes its DEFAULT_POLICY / DEFAULT_WEIGHTS value.
        Raises UnknownPolicy or InvalidArgument."""
    @property
    def policy(self) -> str: ...
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
        pressure_weight: float | None = None,
        approx_ttl_s: float | None = None,
        pending_ttl_s: float | None = None,
    ) -> None: ...
    def add_worker(self, worker: int) -> None: ...
    def remove_worker(self, worker: int) -> list[str]:
        """Forget the worker, its reservations (returned request ids) and its predicted cache;
        the index is left to the caller."""
    def set_approx(self, worker: int, approx: bool) -> None:
        """Approximate mode for the worker (True): its cache is predicted from this
        scheduler's decisions (routed prompts' blocks, approx_ttl_s expiry, LRU within its
        reported capacity). Switching either way starts it empty. UnknownWorker if not added."""
    def is_approx(self, worker: int) -> bool: ...
    def approx_blocks(self, worker: int) -> int:
        """Blocks predicted on an approximate worker (0 for exact workers)."""
    def capacity_reports(self) -> dict[str, int]:
        """Load reports whose KV capacity was ignored: {"missing": n, "absurd": n}."""

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
        """Hash, match, score and (when reserve and request_id) reserve. NoRoutableWorker
        if there is no routable candidate, InvalidArgument if the input is bad,
        DuplicateRequest if request_id already holds a reservation. prefill_weight
        overrides the configured one for this call only."""

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
    def reservation_worker(self, request_id: str) -> int | None:
        """The worker a live reservation is on; None when there is none."""
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
        kv_capacity_blocks: int = 0,
        kv_cached_blocks: int = 0,
    ) -> None:
        """A worker's own load. kv_capacity_blocks turns the cache-pressure term on for it;
        0 (missing), above 2^36 or below kv_used_blocks (absurd) turns it off and is counted
        (capacity_reports)."""
    def set_external_load(
        self, worker: int, prefill_tokens: int, decode_blocks: int, requests: int
    ) -> None:
        """In-flight load other router replicas reserved on this worker."""

    def load(self, worker: int, now: float | None = None) -> WorkerLoad: ...
    def loads(self, now: float | None = None) -> list[WorkerLoad]: ...
    def now(self) -> float: ...
