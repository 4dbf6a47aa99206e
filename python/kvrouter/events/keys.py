"""Redis key layout of the event plane (docs/event-plane.md, "Keys").

Every key starts with `{namespace}:` so one Redis can host several routers'
fleets and a namespace can be deleted with one SCAN. The per-shard keys (the
stream and its generation marker) end in a Redis Cluster hash tag
`{namespace/model/shard}`, so one shard's keys live in one slot while shards
spread over the cluster. Names must not contain braces or whitespace: a brace
would change the hash tag, whitespace makes keys hard to operate on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# The name rule is the registration rule; defined once in the protocol layer.
from kvrouter.protocol import check_name


def shard_of(worker: str, num_shards: int) -> int:
    """Stable shard of a worker: crc32 of its UTF-8 name modulo the shard count.

    crc32 (not Python's hash()) so every process, language and restart agrees.
    """
    if num_shards <= 0:
        raise ValueError(f"num_shards must be > 0, got {num_shards}")
    return zlib.crc32(worker.encode()) % num_shards


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace."""

    namespace: str = "kvrouter"

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)

    def _tag(self, model: str, shard: int) -> str:
        return "{" + f"{self.namespace}/{model}/{shard}" + "}"

    def stream(self, model: str, shard: int) -> str:
        """KV event stream of one shard of a model's workers."""
        return f"{self.namespace}:kv:{model}:{self._tag(model, shard)}"

    def stream_marker(self, model: str, shard: int) -> str:
        """Random token created beside each stream; a changed or missing token means
        Redis lost its data (restart without persistence, failover to an empty replica)."""
        return f"{self.namespace}:kvgen:{model}:{self._tag(model, shard)}"

    def streams(self, model: str, num_shards: int) -> list[str]:
        return [self.stream(model, s) for s in range(num_shards)]

    def heartbeat(self, model: str, worker: str) -> str:
        return f"{self.namespace}:hb:{model}:{worker}"

    def workers(self, model: str) -> str:
        """Set of worker names that have heartbeated (members are pruned by routers)."""
        return f"{self.namespace}:workers:{model}"

    def dump_requests(self, model: str, worker: str) -> str:
        """List of full-dump requests for one worker (routers RPUSH, the publisher pops)."""
        return f"{self.namespace}:dump:{model}:{worker}"

    def snapshot(self, model: str, replica: str) -> str:
        """Hash {data: index snapshot bytes, meta: msgpack metadata} with a TTL."""
        return f"{self.namespace}:snap:{model}:{replica}"

    def snapshots(self, model: str) -> str:
        """Sorted set replica -> snapshot time (unix s); members whose key expired are stale."""
        return f"{self.namespace}:snaps:{model}"

    def reservations(self, model: str, replica: str) -> str:
        """One replica's in-flight reservation totals per worker (msgpack, short TTL)."""
        return f"{self.namespace}:resv:{model}:{replica}"

    def replicas(self, model: str) -> str:
        """Set of replica ids that publish reservations for the model."""
        return f"{self.namespace}:replicas:{model}"

    def session(self, model: str, session: str) -> str:
        """The worker of one session (session affinity, kvrouter.server.affinity), with the
        session's TTL; the session key is checked by affinity.check_session first."""
        return f"{self.namespace}:sess:{model}:{session}"

    def pattern(self) -> str:
        """Glob matching every key of the namespace (for cleanup)."""
        return f"{self.namespace}:*"
