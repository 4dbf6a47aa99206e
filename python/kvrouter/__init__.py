"""kvrouter: a KV-cache-aware router and load balancer for LLM inference fleets.

The Rust core (`kvrouter._core`) owns hashing, the prefix index, scoring and
load accounting; this package owns I/O, configuration and the network.
"""

from kvrouter._core import (
    DEFAULT_POLICY,
    DEFAULT_WEIGHTS,
    HASH_SEED,
    POLICIES,
    ApplyResult,
    Candidate,
    Decision,
    DuplicateRequest,
    InvalidArgument,
    KvrouterError,
    MalformedPayload,
    NoRoutableWorker,
    Overlap,
    PrefixIndex,
    Scheduler,
    SnapshotError,
    UnknownPolicy,
    UnknownWorker,
    WorkerLoad,
    decode_payload,
    hash_blocks,
    local_block_hash,
)

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

__version__ = "0.1.0"
