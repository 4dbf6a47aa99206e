"""Models and workers known to a router: the one place their state lives.

Each model has its own prefix index, block size and scheduler (docs/design.md §3.3);
workers are named by strings on the wire and by dense integer ids inside the
Rust core. The gRPC service, the event ingest, liveness and the simulator all
go through this registry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from kvrouter._core import PrefixIndex, Scheduler, UnknownWorker
from kvrouter.protocol import check_address, check_name, check_worker_metadata, kv_mode_of


class Role(StrEnum):
    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


class WorkerStatus(StrEnum):
    UP = "up"
    DRAINING = "draining"
    DOWN = "down"
    MISMATCH = "mismatch"  # engine block size / hash scheme incompatible with the model


@dataclass
class WorkerInfo:
    name: str
    wid: int
    model: str
    role: Role = Role.AGGREGATED
    address: str = ""
    status: WorkerStatus = WorkerStatus.UP
    status_reason: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    epoch: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def routable(self) -> bool:
        return self.status is WorkerStatus.UP


@dataclass
class ModelState:
    name: str
    block_size: int
    index: PrefixIndex
    scheduler: Scheduler
    workers: dict[str, WorkerInfo] = field(default_factory=dict)


class UnknownModel(KeyError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model

    def __str__(self) -> str:
        return f"unknown model {self.model!r}"


class UnknownWorkerName(UnknownWorker):
    """A worker name the registry does not know (the core's UnknownWorker is by id)."""

    def __init__(self, worker: str, model: str | None = None) -> None:
        super().__init__(worker)
        self.worker = worker
        self.model = model

    def __str__(self) -> str:
        where = f" for model {self.model!r}" if self.model else ""
        return f"unknown worker {self.worker!r}{where}"


class Registry:
    """Thread-safe registry of models and workers."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.models: dict[str, ModelState] = {}
        self._next_wid = 1
        self._by_wid: dict[int, WorkerInfo] = {}

    # models -------------------------------------------------------------
    def add_model(self, name: str, block_size: int, scheduler_kwargs: dict[str, object] | None = None,
                  ) -> ModelState:
        if not name:
            raise ValueError("model name must not be empty")
        if block_size <= 0:
            raise ValueError(f"model {name!r}: block_size must be > 0, got {block_size}")
        with self._lock:
            if name in self.models:
                raise ValueError(f"model {name!r} already registered")
            index = PrefixIndex(block_size)
            scheduler = Scheduler(index, **(scheduler_kwargs or {}))  # type: ignore[arg-type]
            state = ModelState(name=name, block_size=block_size, index=index, scheduler=scheduler)
            self.models[name] = state
            return state

    def model(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            raise UnknownModel(name)
        return state

    # workers ------------------------------------------------------------
    def upsert_worker(self, model: str, name: str, role: Role = Role.AGGREGATED, address: str = "",
                      metadata: dict[str, str] | None = None) -> WorkerInfo:
        """Register a worker (or refresh an existing one) and make it routable.

        Everything is checked before anything changes (ProtocolError, a ValueError:
        the name, address and metadata limits of kvrouter.protocol)."""
        check_name("worker", name)
        check_address(address)
        with self._lock:
            state = self.model(model)
            info = state.workers.get(name)
            # Metadata merges into what the worker registered before: the merged map
            # is what must stay within the limits.
            merged = check_worker_metadata(
                {**info.metadata, **metadata} if info is not None and metadata
                else metadata or {})
            if info is None:
                info = WorkerInfo(name=name, wid=self._next_wid, model=model, role=role,
                                  address=address, metadata=merged)
                self._next_wid += 1
                state.workers[name] = info
                self._by_wid[info.wid] = info
                state.scheduler.add_worker(info.wid)
            else:
                info.role = role
                if address:
                    info.address = address
                if metadata:
                    info.metadata = merged
            info.last_seen = time.monotonic()
            if info.status is WorkerStatus.DOWN:
                info.status = WorkerStatus.UP
                info.status_reason = ""  # the reason it was down no longer holds
            state.scheduler.set_routable(info.wid, info.routable)
            # Approximate mode (engines without KV events); a switch starts the cache empty.
            state.scheduler.set_approx(info.wid, kv_mode_of(info.metadata) == "approx")
            return info

    def worker(self, model: str, name: str) -> WorkerInfo:
        info = self.model(model).workers.get(name)
        if info is None:
            raise UnknownWorkerName(name, model)
        return info

    def touch(self, model: str, name: str, now: float | None = None) -> None:
        """Record that the worker was heard from (heartbeat, fresh events); unknown
        workers are ignored."""
        state = self.models.get(model)
        info = state.workers.get(name) if state is not None else None
        if info is not None:
            info.last_seen = time.monotonic() if now is None else now

    def by_wid(self, wid: int) -> WorkerInfo:
        return self._by_wid[wid]

    def set_status(self, model: str, name: str, status: WorkerStatus, reason: str = "") -> WorkerInfo:
        with self._lock:
            info = self.worker(model, name)
            info.status = status
            info.status_reason = reason
            self.model(model).scheduler.set_routable(info.wid, info.routable)
            return info

    def remove_worker(self, model: str, name: str) -> list[str]:
        """Forget a worker: index entries, reservations and routing. Returns dropped request ids."""
        with self._lock:
            state = self.model(model)
            info = state.workers.pop(name, None)
            if info is None:
                raise UnknownWorkerName(name, model)
            self._by_wid.pop(info.wid, None)
            state.index.remove_worker(info.wid)
            return state.scheduler.remove_worker(info.wid)

    def all_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [w for m in self.models.values() for w in m.workers.values()]
