"""Sharing in-flight reservations between router replicas.

Each replica writes its own per-worker reservation totals (prefill tokens,
decode blocks, requests) for each model to `{ns}:resv:{model}:{replica}`
(msgpack, TTL a few intervals) and reads every other replica's, then feeds the
sum of the OTHER replicas' totals into Scheduler.set_external_load. Totals are
keyed by worker name because worker ids are local to each replica.

Staleness: another replica's reservation is seen after at most about two
intervals (its write + our read); a replica that dies stops counting when its
key expires (the TTL).
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from kvrouter.events.keys import Keys
from kvrouter.events.redis_conn import RedisClient
from kvrouter.registry import Registry

log = logging.getLogger("kvrouter.events.reservations")

Totals = dict[str, tuple[int, int, int]]


def own_totals(registry: Registry, model: str) -> Totals:
    state = registry.model(model)
    names = {w.wid: w.name for w in list(state.workers.values())}
    out: Totals = {}
    for wl in state.scheduler.loads():
        if wl.reserved_requests or wl.reserved_prefill_tokens or wl.reserved_decode_blocks:
            name = names.get(wl.worker)
            if name is not None:
                out[name] = (wl.reserved_prefill_tokens, wl.reserved_decode_blocks, wl.reserved_requests)
    return out


def _decode(raw: bytes) -> Totals:
    d = msgpack.unpackb(raw, raw=False)
    if not isinstance(d, dict):
        raise ValueError("reservations are not a map")
    out: Totals = {}
    for k, v in d.items():
        p, b, r = (int(x) for x in v)
        out[str(k)] = (max(p, 0), max(b, 0), max(r, 0))
    return out


async def sync_model(client: RedisClient, keys: Keys, registry: Registry, model: str,
                     replica: str, ttl_s: float) -> dict[str, Any]:
    """One round for one model: publish ours, read the others', apply the sums."""
    mine = own_totals(registry, model)
    packed = msgpack.packb({k: list(v) for k, v in mine.items()})
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.reservations(model, replica), packed, px=max(1, int(ttl_s * 1000)))
    pipe.sadd(keys.replicas(model), replica)
    pipe.smembers(keys.replicas(model))
    _, _, members = await pipe.execute()
    others = sorted(r.decode() for r in members if r.decode() != replica)
    sums: dict[str, list[int]] = {}
    if others:
        pipe = client.pipeline(transaction=False)
        for r in others:
            pipe.get(keys.reservations(model, r))
        raws = await pipe.execute()
        gone = []
        for r, raw in zip(others, raws, strict=True):
            if raw is None:
                gone.append(r)
                continue
            try:
                totals = _decode(raw)
            except Exception as exc:
                log.debug("bad reservations ignored: replica=%s error=%r", r, exc)
                continue
            for name, (p, b, n) in totals.items():
                acc = sums.setdefault(name, [0, 0, 0])
                acc[0] += p
                acc[1] += b
                acc[2] += n
        if gone:
            await client.srem(keys.replicas(model), *gone)
    state = registry.model(model)
    for w in list(state.workers.values()):
        p, b, n = sums.get(w.name, (0, 0, 0))
        state.scheduler.set_external_load(w.wid, p, b, n)
    return {"replicas": len(others) + 1, "external_workers": len(sums)}


async def withdraw(client: RedisClient, keys: Keys, models: list[str], replica: str) -> None:
    pipe = client.pipeline(transaction=False)
    for model in models:
        pipe.delete(keys.reservations(model, replica))
        pipe.srem(keys.replicas(model), replica)
    await pipe.execute()
