"""Index snapshots in Redis, and trimming the streams behind them.

A snapshot is one hash per (model, replica): `data` is PrefixIndex.snapshot()
bytes, `meta` is msgpack with the stream positions the snapshot covers, every
tracked worker's id, epoch, seq and last stream id, the stream markers (so a
snapshot from before a Redis data loss is never trusted) and a timestamp. Each
snapshot key has a TTL; a sorted set lists the replicas' snapshots by time.
A starting replica loads the newest usable snapshot and replays the streams from
its positions. Streams are trimmed (XTRIM MINID ~) behind the oldest live
snapshot, never closer to the head than `min_retention_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvrouter.events import metrics as m
from kvrouter.events.ingest import AWAITING_HEARTBEAT, IngestCore, WorkerTrack
from kvrouter.events.keys import Keys
from kvrouter.events.redis_conn import RedisClient
from kvrouter.events.wire import parse_stream_id
from kvrouter.registry import Registry, Role, UnknownWorkerName, WorkerStatus

log = logging.getLogger("kvrouter.events.snapshots")

F_DATA = b"data"
F_META = b"meta"


@dataclass
class SnapshotInfo:
    replica: str
    model: str
    t: float
    block_size: int
    positions: dict[str, bytes]
    markers: dict[str, bytes]
    workers: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


def _meta_dict(info: SnapshotInfo) -> dict[str, Any]:
    return {"v": 1, "replica": info.replica, "model": info.model, "t": info.t,
            "block_size": info.block_size, "positions": info.positions, "markers": info.markers,
            "workers": info.workers, "size": info.size}


def decode_meta(raw: bytes) -> SnapshotInfo:
    """Raises ValueError (or a msgpack / lookup error) on metadata that cannot be used,
    including stream ids that are not ids: the snapshot is then ignored as a whole."""
    d = msgpack.unpackb(raw, raw=False)
    info = SnapshotInfo(replica=str(d["replica"]), model=str(d["model"]), t=float(d["t"]),
                        block_size=int(d["block_size"]),
                        positions={str(k): bytes(v) for k, v in d["positions"].items()},
                        markers={str(k): bytes(v) for k, v in d["markers"].items()},
                        workers=list(d["workers"]), size=int(d.get("size", 0)))
    for sid in info.positions.values():
        parse_stream_id(sid)
    for w in info.workers:
        if w.get("last_id") is not None:
            parse_stream_id(w["last_id"])
    return info


def _track_record(tr: WorkerTrack, info_role: str, address: str) -> dict[str, Any]:
    return {"name": tr.name, "wid": tr.wid, "epoch": tr.epoch, "seq": tr.seq,
            "last_id": tr.last_id, "stream": tr.stream, "past_epochs": tr.past_epochs,
            "role": info_role, "address": address}


async def capture(core: IngestCore, model: str, replica: str, streams: list[str],
                  markers: dict[str, bytes]) -> tuple[bytes, SnapshotInfo]:
    """Index bytes plus the positions and worker seqs they correspond to, taken
    under the ingest lock so nothing is applied in between."""
    registry = core.registry
    async with core.lock:
        state = registry.model(model)
        data = await asyncio.to_thread(state.index.snapshot)
        workers = []
        for (mname, wname), tr in core.tracks.items():
            if mname != model:
                continue
            info = state.workers.get(wname)
            workers.append(_track_record(tr, info.role.value if info else "aggregated",
                                         info.address if info else ""))
        positions = {s: core.positions[s] for s in streams if s in core.positions}
    snap = SnapshotInfo(replica=replica, model=model, t=time.time(), block_size=state.block_size,
                        positions=positions, markers={s: markers[s] for s in streams if s in markers},
                        workers=workers, size=len(data))
    return data, snap


async def write(client: RedisClient, keys: Keys, data: bytes, info: SnapshotInfo, ttl_s: float) -> None:
    key = keys.snapshot(info.model, info.replica)
    meta = msgpack.packb(_meta_dict(info), use_bin_type=True)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping={F_DATA: data, F_META: meta})  # type: ignore[arg-type,unused-ignore]
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.zadd(keys.snapshots(info.model), {info.replica: info.t})
    await pipe.execute()
    m.SNAPSHOTS_WRITTEN.inc()
    m.SNAPSHOT_BYTES.labels(info.model).set(len(data))


async def live_snapshots(client: RedisClient, keys: Keys, model: str) -> list[SnapshotInfo]:
    """Metadata of every snapshot whose key still exists, newest first (stale
    members of the sorted set are removed)."""
    members: list[Any] = await client.zrange(keys.snapshots(model), 0, -1)
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for r in members:
        pipe.hget(keys.snapshot(model, r.decode()), F_META)
    metas = await pipe.execute()
    out, stale = [], []
    for r, raw in zip(members, metas, strict=True):
        if raw is None:
            stale.append(r)
            continue
        try:
            out.append(decode_meta(raw))
        except Exception as exc:
            log.warning("unreadable snapshot metadata ignored: model=%s replica=%s error=%r",
                        model, r.decode(errors="replace"), exc)
    if stale:
        await client.zrem(keys.snapshots(model), *stale)
    out.sort(key=lambda s: s.t, reverse=True)
    return out


def _usable(info: SnapshotInfo, block_size: int, markers: dict[str, bytes]) -> bool:
    if info.block_size != block_size:
        return False
    # Positions of a stream whose marker changed belong to data Redis lost.
    return all(markers.get(s) == tok for s, tok in info.markers.items())


async def load_newest(
    client: RedisClient, keys: Keys, core: IngestCore, models: list[str], markers: dict[str, bytes]
) -> dict[str, str]:
    """Load the newest usable snapshot of each model into its index, register its
    workers (not routable until a heartbeat confirms them) and restore positions and
    seqs. Returns model -> replica whose snapshot was loaded."""
    registry: Registry = core.registry
    chosen: dict[str, tuple[SnapshotInfo, bytes]] = {}
    for model in models:
        state = registry.model(model)
        for info in await live_snapshots(client, keys, model):
            if not _usable(info, state.block_size, markers):
                continue
            data: Any = await client.hget(keys.snapshot(model, info.replica), F_DATA)
            if not isinstance(data, bytes):
                continue
            chosen[model] = (info, data)
            break
    if not chosen:
        return {}
    # Worker ids inside a snapshot are the writer's registry ids. Register the workers
    # in ascending id order so a fresh registry hands out the same ids.
    records = sorted(((w["wid"], model, w) for model, (info, _) in chosen.items() for w in info.workers),
                     key=lambda x: x[0])
    loaded: dict[str, str] = {}
    async with core.lock:
        assigned: dict[str, dict[int, int]] = {model: {} for model in chosen}
        for wid, model, w in records:
            try:
                role = Role(w.get("role", "aggregated"))
            except ValueError:
                role = Role.AGGREGATED
            existing = registry.model(model).workers.get(w["name"])
            winfo = registry.upsert_worker(model, w["name"], role=role, address=w.get("address", ""))
            if existing is None:
                registry.set_status(model, w["name"], WorkerStatus.DOWN, AWAITING_HEARTBEAT)
            assigned[model][wid] = winfo.wid
        now = time.monotonic()
        for model, (info, data) in chosen.items():
            t0 = time.perf_counter()
            state = registry.model(model)
            mapping = assigned[model]
            ok = False
            if all(a == b for a, b in mapping.items()):
                await asyncio.to_thread(state.index.load_snapshot, data)
                ok = True
            else:
                ok = await _load_remapped(state.index, data, mapping)
            if not ok:
                log.warning("snapshot worker ids do not match this registry and the index cannot "
                            "remap them; replaying the streams instead: model=%s replica=%s",
                            model, info.replica)
                for w in info.workers:
                    wi = state.workers.get(w["name"])
                    if wi is not None and wi.status is WorkerStatus.DOWN:
                        try:
                            registry.remove_worker(model, w["name"])
                        except UnknownWorkerName:
                            pass
                continue
            for w in info.workers:
                tr = WorkerTrack(model=model, name=w["name"], wid=mapping[w["wid"]],
                                 stream=w.get("stream") or "", epoch=w.get("epoch"),
                                 seq=int(w.get("seq", -1)), last_id=w.get("last_id"),
                                 past_epochs=list(w.get("past_epochs") or []), last_seen=now)
                core.tracks[(model, w["name"])] = tr
            core.positions.update(info.positions)
            loaded[model] = info.replica
            m.SNAPSHOT_LOAD_SECONDS.labels(model).set(time.perf_counter() - t0)
            log.info("snapshot loaded: model=%s replica=%s workers=%d bytes=%d age_s=%.1f", model,
                     info.replica, len(info.workers), len(data), time.time() - info.t)
    return loaded


async def _load_remapped(index: Any, data: bytes, mapping: dict[int, int]) -> bool:
    """Load with a worker-id map when the extension supports it."""
    loader = index.load_snapshot
    try:
        await asyncio.to_thread(loader, data, mapping)
        return True
    except TypeError:
        return False


async def trim(client: RedisClient, keys: Keys, model: str, streams: list[str],
               markers: dict[str, bytes], min_retention_s: float) -> int:
    """XTRIM each stream behind the oldest live snapshot's position (entries that
    no snapshot needs), keeping at least min_retention_s of history."""
    snaps = [s for s in await live_snapshots(client, keys, model)
             if all(markers.get(k) == v for k, v in s.markers.items())]
    if not snaps:
        return 0
    floor_ms = int((time.time() - min_retention_s) * 1000)
    trimmed = 0
    for stream in streams:
        positions = [s.positions.get(stream) for s in snaps]
        if any(p is None for p in positions):
            continue  # some snapshot needs this stream from its start
        oldest = min(parse_stream_id(p) for p in positions if p is not None)
        minid = min(oldest, (floor_ms, 0))
        if minid[0] <= 0:
            continue
        n = await client.xtrim(stream, minid=f"{minid[0]}-{minid[1]}", approximate=True)
        trimmed += int(n)
    if trimmed:
        m.STREAM_TRIMMED.inc(trimmed)
    return trimmed
