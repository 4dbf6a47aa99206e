"""What every event plane is: the interface the router uses and its options.

The planes themselves live in kvrouter.events.inprocess (`InProcessPlane`, the
embedded default) and kvrouter.events.redis_plane (`RedisPlane`);
kvrouter.events.plane.make_event_plane chooses one. See docs/event-plane.md for
the protocol and the consistency model.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from kvrouter.config import LayeredSettings
from kvrouter.events.ingest import IngestCore
from kvrouter.events.model import LoadReport
from kvrouter.events.publisher import EventPublisher
from kvrouter.events.wire import (
    H_LOAD,
    H_META,
    H_STATE,
    MAX_EPOCH_LEN,
    MAX_SEQ,
    STATE_LEAVING,
    STATE_UP,
    encode_load,
    encode_meta,
)
from kvrouter.protocol import check_name
from kvrouter.registry import Registry


class PlaneOptions(LayeredSettings):
    """Event-plane options, validated like every option type (kvrouter.config)."""

    namespace: str = "kvrouter"
    replica_id: str | None = Field(default=None, description="default: host-pid-random")
    num_shards: int = Field(default=1, ge=1, le=1024)
    heartbeat_ttl_s: float = Field(default=3.0, gt=0)
    liveness_interval_s: float | None = Field(
        default=None, gt=0, description="default: a sixth of the TTL, at most 0.5 s")
    dump_timeout_s: float = Field(default=5.0, gt=0)
    max_payload_bytes: int = Field(default=64 << 20, gt=0)
    xread_count: int = Field(default=4096, gt=0)
    xread_block_ms: int = Field(default=500, ge=0)
    max_repair_scan: int = Field(default=1_000_000, gt=0)
    snapshot_interval_s: float = Field(default=30.0, ge=0,
                                       description="0 disables snapshots (and trimming)")
    snapshot_ttl_s: float | None = Field(default=None, gt=0,
                                         description="default: max(3 intervals, 60 s)")
    snapshot_min_retention_s: float = Field(default=10.0, ge=0)
    load_snapshot: bool = True
    reservation_interval_s: float = Field(default=0.2, gt=0)
    reservation_ttl_s: float | None = Field(default=None, gt=0,
                                            description="default: 10 intervals, at least 1 s")
    max_stream_len: int | None = Field(default=1_000_000, gt=0)
    max_submit_backlog: int = Field(default=100_000, gt=0)
    start_timeout_s: float = Field(default=5.0, gt=0)
    # Signed events through Redis (kvrouter.security.signing, docs/security.md).
    signing_secret_file: str | None = Field(
        default=None, description="secret the workers' event keys derive from; None: no checks")
    require_signed: bool = Field(
        default=True, description="with a secret: drop unsigned entries and heartbeats "
                                  "(false: accept them, for a rolling upgrade)")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        check_name("namespace", v)
        return v

    @field_validator("replica_id")
    @classmethod
    def _replica(cls, v: str | None) -> str:
        if v is None:
            v = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        check_name("replica", v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """Defaults that follow other options (before validation, so that a derived value
        is validated like a given one)."""
        if not isinstance(data, Mapping):
            return data
        d = dict(data)

        def given(name: str, default: float) -> float | None:
            # Only from a valid value: an invalid one is reported as itself, not twice.
            try:
                v = float(d.get(name, default))
            except (TypeError, ValueError):
                return None
            return v if v > 0 else None

        ttl, snap, res = (given("heartbeat_ttl_s", 3.0), given("snapshot_interval_s", 30.0),
                          given("reservation_interval_s", 0.2))
        if d.get("liveness_interval_s") is None and ttl is not None:
            d["liveness_interval_s"] = min(0.5, ttl / 6)
        if d.get("snapshot_ttl_s") is None:
            d["snapshot_ttl_s"] = max(3 * (snap or 0.0), 60.0)
        if d.get("reservation_ttl_s") is None and res is not None:
            d["reservation_ttl_s"] = max(10 * res, 1.0)
        d.setdefault("replica_id", None)  # so that its validator makes one
        return d


class EventPlane(ABC):
    """Common interface of the in-process and Redis planes."""

    events_confirm_liveness = False
    """Whether a worker's fresh events alone make it routable (IngestCore's option of
    that name): only where workers may deliver without ever heartbeating."""

    def __init__(self, registry: Registry, opts: PlaneOptions) -> None:
        self.registry = registry
        self.opts = opts
        self.replica_id: str = opts.replica_id or ""
        self.core = IngestCore(registry, None, liveness_ttl_s=opts.heartbeat_ttl_s,
                               events_confirm_liveness=self.events_confirm_liveness,
                               dump_timeout_s=opts.dump_timeout_s,
                               max_payload_bytes=opts.max_payload_bytes)
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        """Accept one batch of a worker's events (the PublishEvents RPC calls this).
        Raises UnknownModel or ValueError on bad input, changing nothing."""

    @abstractmethod
    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None: ...

    @abstractmethod
    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        """A publisher for a worker living in this process."""

    def submit_heartbeat(self, model: str, worker: str, *, role: str = "aggregated",
                         address: str = "", block_size: int = 0, epoch: str = "", seq: int = -1,
                         load: LoadReport | None = None, leaving: bool = False) -> None:
        """Heartbeat of a worker that talks to the router over gRPC instead of Redis."""
        self._check(model, worker)
        meta = {"role": role, "address": address, "block_size": block_size, "epoch": epoch, "seq": seq}
        fields = {H_META: encode_meta(meta), H_STATE: (STATE_LEAVING if leaving else STATE_UP).encode()}
        if load is not None:
            fields[H_LOAD] = encode_load(load)
        self.submit_heartbeat_fields(model, worker, fields)

    def _check(self, model: str, worker: str) -> None:
        self.registry.model(model)  # UnknownModel
        check_name("worker", worker)

    def _check_submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes) -> None:
        self._check(model, worker)
        if not isinstance(epoch, str) or not epoch or len(epoch.encode()) > MAX_EPOCH_LEN:
            raise ValueError(f"epoch must be a non-empty string of at most {MAX_EPOCH_LEN} bytes")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"seq must be an integer in 0..2^63-1, got {seq!r}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError("payload must be bytes")
        if len(payload) > self.opts.max_payload_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the limit of "
                             f"{self.opts.max_payload_bytes}")

    def stats(self) -> dict[str, Any]:
        d = self.core.stats.as_dict()
        d["workers_tracked"] = len(self.core.tracks)
        return d
