"""The in-process event plane: the embedded default for one process (demo,
simulator, pure-logic tests).

Publishers in the same process (through kvrouter.events.sink.EventSink, which this
plane implements) and the gRPC PublishEvents RPC (through `submit`) feed one
IngestCore through a queue. No stream history is kept, so every gap asks the
worker for a full dump.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from kvrouter.events.plane_base import EventPlane, PlaneOptions
from kvrouter.events.publisher import EventPublisher, InProcessTransport
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.events.wire import H_BEAT, STATE_LEAVING, DumpRequest, Entry, parse_heartbeat
from kvrouter.registry import Registry

log = logging.getLogger("kvrouter.events.inprocess")

class _InProcessRepair:
    def __init__(self, plane: InProcessPlane) -> None:
        self.plane = plane

    async def read_range(self, model: str, stream: str, after: bytes | None,
                         before: bytes | None) -> list[Entry] | None:
        return None  # no history kept: a gap always asks for a dump

    async def request_dump(self, model: str, worker: str, epoch: str, reason: str) -> None:
        self.plane._dump_queue(model, worker).put_nowait(
            DumpRequest(self.plane.replica_id, epoch, reason, time.time()))


class InProcessPlane(EventPlane):
    # Workers delivering over gRPC may never heartbeat: their events prove they live.
    events_confirm_liveness = True

    def __init__(self, registry: Registry, opts: PlaneOptions) -> None:
        super().__init__(registry, opts)
        self._beats: dict[tuple[str, str], int] = {}
        self.core.repairer = _InProcessRepair(self)
        self._queue: deque[tuple[str, Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dumps: dict[tuple[str, str], asyncio.Queue[DumpRequest]] = {}
        self._last_fields: dict[tuple[str, str], dict[bytes, bytes]] = {}

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._apply_loop(), name="kv-inprocess-apply"),
                       asyncio.create_task(self._liveness_loop(), name="kv-inprocess-liveness")]

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []

    def _enqueue(self, model: str, item: Any) -> None:
        self._queue.append((model, item))
        if self._wake is not None and self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)

    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        self._check_submit(model, worker, epoch, seq, payload)
        self._enqueue(model, Entry(model, "", b"", worker, epoch, seq, bytes(payload),
                                   time.time() if t is None else t, kind))

    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        self._check(model, worker)
        key = (model, worker)
        self._beats[key] = self._beats.get(key, 0) + 1
        merged = dict(fields)
        merged[H_BEAT] = str(self._beats[key]).encode()
        self._enqueue(model, (worker, merged))

    async def _apply_loop(self) -> None:
        assert self._wake is not None
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                model, item = self._queue.popleft()
                if isinstance(item, Entry):
                    entries = [item]
                    # Group consecutive entries of one model into one batched apply.
                    while self._queue and self._queue[0][0] == model and isinstance(self._queue[0][1], Entry):
                        entries.append(self._queue.popleft()[1])
                        if len(entries) >= 4096:
                            break
                    try:
                        await self.core.ingest_entries(model, entries)
                    except Exception:
                        log.exception("in-process apply failed: model=%s", model)
                else:
                    worker, fields = item
                    await self._observe(model, worker, fields)
            self.core.read_generation += 1

    async def _observe(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        prev = self._last_fields.get((model, worker), {})
        merged = {**prev, **fields}
        self._last_fields[(model, worker)] = merged
        try:
            hb = parse_heartbeat(worker, merged)
        except ValueError as exc:
            log.warning("%s", exc)
            return
        try:
            await self.core.observe_heartbeat(model, hb)
        except Exception:
            log.exception("heartbeat handling failed: model=%s worker=%s", model, worker)
        if hb.state == STATE_LEAVING:
            self._last_fields.pop((model, worker), None)

    async def _liveness_loop(self) -> None:
        interval = self.opts.liveness_interval_s or 0.5
        while self._running:
            await asyncio.sleep(interval)
            try:
                for name in await self.core.remove_lapsed():
                    log.info("worker lapsed: worker=%s", name)
                    for key in [k for k in self._last_fields if k[1] == name]:
                        self._last_fields.pop(key, None)
                await self.core.retry_dumps()
            except Exception:
                log.exception("in-process liveness round failed")

    def _dump_queue(self, model: str, worker: str) -> asyncio.Queue[DumpRequest]:
        q = self._dumps.get((model, worker))
        if q is None:
            q = self._dumps[(model, worker)] = asyncio.Queue()
        return q

    async def wait_dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        q = self._dump_queue(model, worker)
        try:
            first = await asyncio.wait_for(q.get(), timeout_s)
        except TimeoutError:
            return []
        out = [first]
        while not q.empty():
            out.append(q.get_nowait())
        return out

    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        return EventPublisher(InProcessTransport(self), model, worker, **opts)
