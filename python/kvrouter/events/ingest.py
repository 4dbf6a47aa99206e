"""Router side of the event plane: per-worker sequence tracking and batched apply.

`IngestCore` is transport-agnostic: the Redis plane feeds it XREAD batches, the
in-process plane feeds it submitted entries. It keeps, per (model, worker), the
epoch and last applied seq; detects duplicates, new epochs and gaps; repairs a
gap by re-reading the range from the stream or, when the range is gone, by
asking the worker for a full dump; and applies payloads with one
PrefixIndex.apply_payloads call per batch in a worker thread (the Rust side
releases the GIL), so the gRPC event loop only does envelope parsing.
`python -m kvrouter.events` runs the Redis plane's ingest as a process of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvrouter.counters import ApplyTotals, Counters
from kvrouter.events import metrics as m
from kvrouter.events.wire import Entry, Heartbeat, Verify, parse_entry, parse_stream_id
from kvrouter.protocol import check_block_size
from kvrouter.registry import Registry, Role, UnknownModel, UnknownWorkerName, WorkerStatus

log = logging.getLogger("kvrouter.events.ingest")

AWAITING_HEARTBEAT = "awaiting heartbeat"


class Repairer(Protocol):
    """What the transport offers to repair gaps."""

    async def read_range(
        self, model: str, stream: str, after: bytes | None, before: bytes | None
    ) -> list[Entry] | None:
        """Entries of `stream` strictly between the two ids (None: open end), or None
        when the transport keeps no history or the range is too long to scan."""

    async def request_dump(self, model: str, worker: str, epoch: str, reason: str) -> None: ...


@dataclass
class WorkerTrack:
    """What the ingest knows about one worker's event stream."""

    model: str
    name: str
    wid: int
    stream: str = ""
    epoch: str | None = None
    seq: int = -1
    last_id: bytes | None = None
    """Stream id of the last applied entry: the lower bound of a repair scan."""
    past_epochs: list[str] = field(default_factory=list)
    last_seen: float = 0.0
    last_scan: float = -1e9
    confirmed: bool = False
    incomplete: bool = False
    """Index state may lack events (restored from a tombstone): dump on confirmation."""
    hb_beat: int | None = None
    hb_pos: tuple[str, int] | None = None
    hb_gen: int = 0
    load_t: float = 0.0
    dump_epoch: str | None = None
    dump_at: float = 0.0
    dump_backoff: float = 0.0
    malformed_logged: bool = False


@dataclass
class IngestStats(Counters):
    entries_applied: int = 0
    blocks_stored: int = 0
    blocks_duplicate: int = 0
    blocks_removed: int = 0
    unknown_removals: int = 0
    blocks_cleared: int = 0
    orphan_events: int = 0
    duplicate_entries: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    gaps_stream: int = 0
    gaps_dump: int = 0
    epoch_resets: int = 0
    dumps_requested: int = 0
    dumps_received: int = 0
    workers_lapsed: int = 0
    data_losses: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d["malformed_total"] = sum(self.malformed.values())  # read by tests and status pages
        return d


# How each core apply counter (ApplyResult.FIELDS) this plane tallies is kept: its
# IngestStats field and its kvrouter_events_blocks_total label (None: not a block count).
_TALLIED: dict[str, tuple[str, str | None]] = {
    "stored_blocks": ("blocks_stored", "stored"),
    "duplicate_blocks": ("blocks_duplicate", "duplicate"),
    "removed_blocks": ("blocks_removed", "removed"),
    "unknown_removals": ("unknown_removals", "unknown_removal"),
    "cleared_blocks": ("blocks_cleared", "cleared"),
    "orphan_events": ("orphan_events", None),
}


class IngestCore:
    """Applies event entries to the registry's per-model indexes, in order, per worker."""

    # Checks each entry's signature (kvrouter.security.signing via the Redis plane); None:
    # entries are not signed. Refused entries are counted like malformed ones and dropped.
    entry_verifier: Verify | None = None

    def __init__(
        self,
        registry: Registry,
        repairer: Repairer | None,
        *,
        liveness_ttl_s: float = 3.0,
        dump_timeout_s: float = 5.0,
        dump_backoff_max_s: float = 60.0,
        max_payload_bytes: int = 64 << 20,
        events_confirm_liveness: bool = True,
        repair_min_interval_s: float = 1.0,
        stream_for: Callable[[str, str], str] | None = None,
    ) -> None:
        self.registry = registry
        self.repairer = repairer
        self.liveness_ttl_s = liveness_ttl_s
        self.dump_timeout_s = dump_timeout_s
        self.dump_backoff_max_s = dump_backoff_max_s
        self.max_payload_bytes = max_payload_bytes
        # In-process mode, workers that deliver over gRPC may never heartbeat, so their
        # events make them routable; with Redis every worker heartbeats, and events alone
        # (e.g. old history replayed at start) never make a worker routable.
        self.events_confirm_liveness = events_confirm_liveness
        self.repair_min_interval_s = repair_min_interval_s
        self.stream_for = stream_for
        """(model, worker) -> the stream its entries go to, for workers known from heartbeats."""
        # One lock serialises everything that changes the index or the tracking
        # (apply, repair, liveness removals, snapshot capture): a snapshot then always
        # matches the positions and seqs recorded with it.
        self.lock = asyncio.Lock()
        self.tracks: dict[tuple[str, str], WorkerTrack] = {}
        self.positions: dict[str, bytes] = {}
        self.read_generation = 0
        """Advanced each time the reader reaches the tail of every stream."""
        self.stats = IngestStats()
        # Seq tracking of workers removed before any heartbeat confirmed them (garbage
        # producers, history of dead workers): if they send again they continue from
        # here instead of triggering a rebuild from the stream each time.
        self._tombstones: dict[tuple[str, str], WorkerTrack] = {}
        self._logged_streams: set[str] = set()
        self._malformed_counters = {r: m.MALFORMED.labels(r) for r in (
            "envelope", "payload", "oversize", "unsigned", "bad_signature")}
        self._applied_counters: dict[str, Any] = {}

    # entry points ---------------------------------------------------------------
    async def ingest_raw(self, model: str, stream: str, raw: list[Any]) -> None:
        """Parse one stream's XREAD entries ([id, fields] pairs), apply them and move
        the stream position past them."""
        if not raw:
            return
        async with self.lock:
            entries: list[Entry] = []
            for item in raw:
                eid, fields = item[0], item[1]
                e = parse_entry(model, stream, eid, fields, self.max_payload_bytes,
                                self.entry_verifier)
                if isinstance(e, str):
                    self._count_malformed(e, None, stream, eid)
                else:
                    entries.append(e)
            await self._apply(model, entries)
            self.positions[stream] = bytes(raw[-1][0])

    async def ingest_entries(self, model: str, entries: list[Entry]) -> None:
        async with self.lock:
            await self._apply(model, entries)

    # tracking -------------------------------------------------------------------
    def _track_for_entry(self, model: str, e: Entry, now: float, now_wall: float) -> WorkerTrack:
        key = (model, e.worker)
        tr = self.tracks.get(key)
        state = self.registry.model(model)
        info = state.workers.get(e.worker)
        if tr is not None and (info is None or info.wid != tr.wid):
            # Removed (or replaced) behind our back, e.g. by an operator: start over.
            del self.tracks[key]
            tr = None
        if tr is None:
            created = info is None
            info = self.registry.upsert_worker(model, e.worker)
            tr = WorkerTrack(model=model, name=e.worker, wid=info.wid, stream=e.stream, last_seen=now)
            old = self._tombstones.pop(key, None)
            if old is not None:
                tr.epoch, tr.seq, tr.last_id = old.epoch, old.seq, old.last_id
                tr.past_epochs, tr.last_scan, tr.dump_at = old.past_epochs, old.last_scan, old.dump_at
                tr.malformed_logged = old.malformed_logged
                tr.incomplete = True
            self.tracks[key] = tr
            fresh = e.t > 0 and now_wall - e.t <= self.liveness_ttl_s
            if created and not (fresh and self.events_confirm_liveness):
                # Old history (replay at start): keep its state but do not route to it
                # until a heartbeat confirms the worker is alive.
                self.registry.set_status(model, e.worker, WorkerStatus.DOWN, AWAITING_HEARTBEAT)
        if tr.stream != e.stream:
            tr.stream = e.stream  # shard count changed: the old position means nothing here
            tr.last_id = None
        return tr

    def _remember_epoch(self, tr: WorkerTrack) -> None:
        if tr.epoch is not None:
            tr.past_epochs.append(tr.epoch)
            del tr.past_epochs[:-8]

    async def _start_epoch(self, tr: WorkerTrack, epoch: str, index: Any) -> None:
        if tr.epoch is not None:
            self.stats.epoch_resets += 1
            m.EPOCH_RESETS.inc()
        self._remember_epoch(tr)
        await asyncio.to_thread(index.clear_worker, tr.wid)
        tr.epoch = epoch
        tr.seq = -1
        if tr.dump_epoch is not None and tr.dump_epoch != epoch:
            tr.dump_epoch = None  # a new epoch replaces the state we asked a dump for

    # applying ---------------------------------------------------------------------
    async def _apply(self, model: str, entries: list[Entry]) -> None:
        if not entries:
            return
        try:
            state = self.registry.model(model)
        except UnknownModel:
            return
        index = state.index
        now, now_wall = time.monotonic(), time.time()
        batch: list[tuple[int, bytes]] = []
        metas: list[tuple[WorkerTrack, Entry]] = []
        for e in entries:
            tr = self._track_for_entry(model, e, now, now_wall)
            if e.epoch != tr.epoch:
                if e.epoch in tr.past_epochs:
                    self.stats.duplicate_entries += 1  # a stale epoch's entry re-read: ignore
                    m.DUPLICATES.inc()
                    continue
                if batch:
                    await self._flush(model, index, batch, metas)
                    batch, metas = [], []
                await self._start_epoch(tr, e.epoch, index)
                if e.kind == "dump":
                    self.stats.dumps_received += 1
            if e.seq <= tr.seq:
                self.stats.duplicate_entries += 1
                m.DUPLICATES.inc()
                continue
            if e.seq > tr.seq + 1:
                if batch:
                    await self._flush(model, index, batch, metas)
                    batch, metas = [], []
                found = await self._repair(tr, e.epoch, tr.seq + 1, e.seq - 1, before=e.id)
                for r in found or ():
                    batch.append((tr.wid, r.payload))
                    metas.append((tr, r))
            batch.append((tr.wid, e.payload))
            metas.append((tr, e))
            tr.seq = e.seq
            tr.last_id = e.id
            if e.t > 0 and now_wall - e.t <= self.liveness_ttl_s:
                self._seen(tr, now)
        if batch:
            await self._flush(model, index, batch, metas)

    async def _flush(
        self, model: str, index: Any, batch: list[tuple[int, bytes]], metas: list[tuple[WorkerTrack, Entry]]
    ) -> None:
        t0 = time.perf_counter()
        results = await asyncio.to_thread(index.apply_payloads, batch)
        m.APPLY_SECONDS.observe(time.perf_counter() - t0)
        now_wall = time.time()
        st = self.stats
        ok = 0
        tot = ApplyTotals()  # keyed by the core's counter names (ApplyResult.FIELDS)
        for (tr, e), r in zip(metas, results, strict=True):
            if r.malformed:
                if not self._seen_by_reader(e):
                    self._count_malformed("payload", tr, e.stream, e.id)
                await self._request_dump(tr, e.epoch, "malformed payload")
                continue
            ok += 1
            tot.add(r)
            if e.t > 0:
                lag = now_wall - e.t
                m.INGEST_LAG.observe(lag)
        st.entries_applied += ok
        for name, (stat, label) in _TALLIED.items():
            setattr(st, stat, getattr(st, stat) + tot[name])
            if label is not None and tot[name]:
                m.BLOCKS.labels(label).inc(tot[name])
        counter = self._applied_counters.get(model)
        if counter is None:
            counter = self._applied_counters[model] = m.EVENTS_APPLIED.labels(model)
        counter.inc(ok)
        if tot["orphan_events"]:
            m.ORPHANS.inc(tot["orphan_events"])

    def _seen_by_reader(self, e: Entry) -> bool:
        """Whether a re-applied (repair) entry was already read, and counted, by the reader."""
        pos = self.positions.get(e.stream)
        if not pos or not e.id:
            return False
        try:
            return parse_stream_id(e.id) <= parse_stream_id(pos)
        except ValueError:
            return False  # not comparable: count the entry rather than lose the count

    def _count_malformed(self, reason: str, tr: WorkerTrack | None, stream: str, eid: bytes) -> None:
        self.stats.malformed[reason] = self.stats.malformed.get(reason, 0) + 1
        self._malformed_counters[reason].inc()
        # Logged once per worker (or per stream when the worker cannot be read) so a
        # misbehaving producer cannot flood the log.
        if tr is not None:
            if not tr.malformed_logged:
                tr.malformed_logged = True
                log.warning("malformed event entry skipped: reason=%s model=%s worker=%s stream=%s id=%s",
                            reason, tr.model, tr.name, stream, eid.decode(errors="replace"))
        elif stream not in self._logged_streams:
            self._logged_streams.add(stream)
            log.warning("malformed event entry skipped: reason=%s stream=%s id=%s (further ones on "
                        "this stream are only counted)", reason, stream, eid.decode(errors="replace"))

    # repair -----------------------------------------------------------------------
    async def _repair(
        self, tr: WorkerTrack, epoch: str, first: int, last: int, before: bytes | None
    ) -> list[Entry] | None:
        """Entries first..last (and any contiguous ones after, when `before` is None)
        of the worker's epoch, read back from the stream; None after asking for a dump."""
        found: list[Entry] | None = None
        now = time.monotonic()
        # A stream scan per worker at most every repair_min_interval_s: a producer that
        # keeps skipping seqs must not turn every entry into a scan of the stream.
        if self.repairer is not None and tr.stream and now - tr.last_scan >= self.repair_min_interval_s:
            tr.last_scan = now
            try:
                entries = await self.repairer.read_range(tr.model, tr.stream, tr.last_id, before)
            except Exception as exc:  # Redis trouble: fall through to a dump request
                log.debug("gap repair read failed: worker=%s error=%r", tr.name, exc)
                entries = None
            if entries is not None:
                got: dict[int, Entry] = {}
                for x in entries:
                    if x.worker == tr.name and x.epoch == epoch and x.seq >= first:
                        got.setdefault(x.seq, x)
                if all(s in got for s in range(first, last + 1)):
                    found = []
                    s = first
                    while s in got:
                        found.append(got[s])
                        s += 1
        if found is not None:
            self.stats.gaps_stream += 1
            m.GAPS.labels("stream").inc()
            tr.seq = found[-1].seq
            tr.last_id = found[-1].id
            log.debug("gap repaired from stream: model=%s worker=%s epoch=%s seqs=%d..%d",
                      tr.model, tr.name, epoch, first, tr.seq)
            return found
        self.stats.gaps_dump += 1
        m.GAPS.labels("dump").inc()
        log.info("event gap not in stream, asking for a full dump: model=%s worker=%s epoch=%s "
                 "missing=%d..%d", tr.model, tr.name, epoch, first, last)
        await self._request_dump(tr, epoch, f"gap {first}..{last}")
        return None

    async def _request_dump(self, tr: WorkerTrack, epoch: str, reason: str) -> None:
        now = time.monotonic()
        if tr.dump_epoch == epoch and now - tr.dump_at < tr.dump_backoff:
            return  # one outstanding request per worker and epoch
        if now - tr.dump_at < self.repair_min_interval_s:
            tr.dump_epoch = epoch  # rate limit across epochs too; retry_dumps asks later
            return
        same = tr.dump_epoch == epoch
        tr.dump_backoff = min(tr.dump_backoff * 2, self.dump_backoff_max_s) if same else self.dump_timeout_s
        tr.dump_epoch = epoch
        tr.dump_at = now
        self.stats.dumps_requested += 1
        m.DUMPS_REQUESTED.inc()
        if self.repairer is None:
            return
        try:
            await self.repairer.request_dump(tr.model, tr.name, epoch, reason)
        except Exception as exc:
            log.debug("dump request failed: worker=%s error=%r", tr.name, exc)

    async def retry_dumps(self) -> None:
        """Ask again for dumps that did not arrive within their backoff."""
        async with self.lock:
            now = time.monotonic()
            for tr in list(self.tracks.values()):
                due = now - tr.dump_at >= tr.dump_backoff
                if tr.dump_epoch is not None and tr.dump_epoch == tr.epoch and due:
                    await self._request_dump(tr, tr.dump_epoch, "dump not received")

    # heartbeats and liveness ---------------------------------------------------------
    async def observe_heartbeat(self, model: str, hb: Heartbeat) -> WorkerTrack | None:
        """Register / refresh a worker from its heartbeat; apply its load report; repair
        a tail gap (the heartbeat says the worker wrote seqs this router never applied)."""
        async with self.lock:
            return await self._observe_heartbeat(model, hb)

    async def _observe_heartbeat(self, model: str, hb: Heartbeat) -> WorkerTrack | None:
        state = self.registry.model(model)
        key = (model, hb.worker)
        tr = self.tracks.get(key)
        info = state.workers.get(hb.worker)
        if tr is not None and (info is None or info.wid != tr.wid):
            del self.tracks[key]
            tr = None
        if hb.state == "leaving":
            if tr is not None:
                self._remove(model, hb.worker, "left")
            return None
        now = time.monotonic()
        try:
            role = Role(hb.role)
        except ValueError:
            role = Role.AGGREGATED
        meta = {**(hb.extra or {}), "block_size": str(hb.block_size)} if hb.block_size else dict(
            hb.extra or {})
        if (tr is None or info is None or info.status is WorkerStatus.DOWN or info.role is not role
                or (hb.address and info.address != hb.address)
                or any(info.metadata.get(k) != v for k, v in meta.items())):
            info = self.registry.upsert_worker(model, hb.worker, role=role, address=hb.address,
                                               metadata=meta)
            if tr is None:
                tr = WorkerTrack(model=model, name=hb.worker, wid=info.wid, last_seen=now)
                self.tracks[key] = tr
        mismatch = check_block_size(hb.block_size, state.block_size) if hb.block_size else None
        if mismatch is not None:
            if info.status is not WorkerStatus.MISMATCH:
                log.warning("worker block size incompatible with model: model=%s worker=%s "
                            "engine_block_size=%d model_block_size=%d",
                            model, hb.worker, hb.block_size, state.block_size)
                self.registry.set_status(model, hb.worker, WorkerStatus.MISMATCH,
                                         f"model {model!r}: {mismatch}")
        elif hb.block_size and info.status is WorkerStatus.MISMATCH:
            # Restarted (or reconfigured) with a block size the model can index. A
            # heartbeat without a block size (0: unknown) proves nothing either way.
            log.info("worker block size compatible again: model=%s worker=%s block_size=%d",
                     model, hb.worker, hb.block_size)
            self.registry.set_status(model, hb.worker, WorkerStatus.UP)
        tr.confirmed = True
        if tr.incomplete and tr.epoch is not None:
            tr.incomplete = False
            await self._request_dump(tr, tr.epoch, "state incomplete")
        if not tr.stream and self.stream_for is not None:
            tr.stream = self.stream_for(model, hb.worker)
        if hb.beat != tr.hb_beat:
            tr.hb_beat = hb.beat
            self._seen(tr, now)
        if hb.load is not None and hb.load_t != tr.load_t:
            tr.load_t = hb.load_t
            ld = hb.load
            state.scheduler.report_load(tr.wid, ld.running, ld.queued, ld.kv_used_blocks,
                                        ld.kv_free_blocks, ld.queued_prefill_tokens,
                                        kv_capacity_blocks=ld.kv_capacity_blocks,
                                        kv_cached_blocks=ld.kv_cached_blocks)
        await self._check_tail(tr, hb, state.index)
        return tr

    async def _check_tail(self, tr: WorkerTrack, hb: Heartbeat, index: Any) -> None:
        if not hb.epoch or hb.seq < 0 or hb.epoch in tr.past_epochs:
            return  # nothing published yet, or a heartbeat older than what we applied
        pos = (hb.epoch, hb.seq)
        if pos != tr.hb_pos:
            tr.hb_pos = pos
            tr.hb_gen = self.read_generation
            return
        # The publisher writes (epoch, seq) only after those entries were acknowledged,
        # so after two full reads to the tail they must have been seen.
        if self.read_generation < tr.hb_gen + 2:
            return
        if tr.epoch == hb.epoch and tr.seq >= hb.seq:
            return
        if tr.dump_epoch == hb.epoch and time.monotonic() - tr.dump_at < tr.dump_backoff:
            return
        tr.hb_gen = self.read_generation
        if tr.epoch != hb.epoch:
            await self._start_epoch(tr, hb.epoch, index)
        found = await self._repair(tr, hb.epoch, tr.seq + 1, hb.seq, before=None)
        if found:
            await self._flush(tr.model, index, [(tr.wid, e.payload) for e in found],
                              [(tr, e) for e in found])

    def touch(self, model: str, worker: str) -> None:
        tr = self.tracks.get((model, worker))
        if tr is not None:
            self._seen(tr, time.monotonic())

    def _seen(self, tr: WorkerTrack, now: float) -> None:
        """The worker proved it is alive: the liveness clock and what ListWorkers shows."""
        tr.last_seen = now
        self.registry.touch(tr.model, tr.name, now)

    def lapsed(self, now: float | None = None) -> list[WorkerTrack]:
        now = time.monotonic() if now is None else now
        return [t for t in self.tracks.values() if now - t.last_seen > self.liveness_ttl_s]

    def grace(self) -> None:
        """Restart every worker's liveness clock (after Redis was unreachable: silence
        from Redis says nothing about the workers)."""
        now = time.monotonic()
        for t in self.tracks.values():
            t.last_seen = now

    async def remove_lapsed(self) -> list[str]:
        async with self.lock:
            gone = []
            for tr in self.lapsed():
                self._remove(tr.model, tr.name, "heartbeat lapsed")
                self.stats.workers_lapsed += 1
                m.WORKERS_LAPSED.inc()
                gone.append(tr.name)
            return gone

    def _remove(self, model: str, worker: str, reason: str) -> None:
        tr = self.tracks.pop((model, worker), None)
        if tr is not None and not tr.confirmed and reason == "heartbeat lapsed":
            self._tombstones[(model, worker)] = tr
            while len(self._tombstones) > 10_000:
                self._tombstones.pop(next(iter(self._tombstones)))
        try:
            dropped = self.registry.remove_worker(model, worker)
        except (UnknownWorkerName, UnknownModel):
            dropped = []
        log.info("worker removed: model=%s worker=%s reason=%s dropped_requests=%d",
                 model, worker, reason, len(dropped))

    def stream_lost(self, stream: str) -> None:
        """Redis lost the stream's data: re-read it from its start; repair scans must
        not start from ids of the lost stream."""
        self.positions[stream] = b"0"
        for tr in self.tracks.values():
            if tr.stream == stream:
                tr.last_id = None
        self.stats.data_losses += 1
        m.REDIS_DATA_LOSS.inc()

    def live_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (model, _), tr in self.tracks.items():
            if tr.confirmed:
                out[model] = out.get(model, 0) + 1
        return out
