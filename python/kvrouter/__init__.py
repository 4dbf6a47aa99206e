"""kvrouter: a KV-cache-aware router and load balancer for LLM inference fleets.

The Rust core (`kvrouter._core`) owns hashing, the prefix index, scoring and
load accounting; this package owns I/O, configuration and the network.
"""

from kvrouter._core import (
    HASH_SEED,
    ApplyResult,
    Candidate,
    Decision,
    PrefixIndex,
    Scheduler,
    WorkerLoad,
    decode_payload,
    hash_blocks,
    local_block_hash,
)

__all__ = [
    "HASH_SEED",
    "ApplyResult",
    "Candidate",
    "Decision",
    "PrefixIndex",
    "Scheduler",
    "WorkerLoad",
    "decode_payload",
    "hash_blocks",
    "local_block_hash",
]

__version__ = "0.1.0"
