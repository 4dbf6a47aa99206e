"""`python -m kvrouter.events`: the Redis event plane's ingest as a process of its own.

It builds a router's index from the streams, exactly as `kvrouter serve` does
embedded, without serving requests. With `--state-file` it writes, periodically and
atomically, every worker's indexed router hashes plus the plane's stats as JSON, so
another process can compare indexes (the tests SIGKILL it and start another from the
snapshot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from typing import Any

from kvrouter import mainloop
from kvrouter.events.plane import make_event_plane
from kvrouter.events.plane_base import EventPlane
from kvrouter.registry import Registry


def _parse_models(specs: list[str]) -> list[tuple[str, int]]:
    out = []
    for spec in specs:
        name, _, bs = spec.partition(":")
        if not name or not bs.isdigit():
            raise SystemExit(f"--model expects NAME:BLOCK_SIZE, got {spec!r}")
        out.append((name, int(bs)))
    return out


async def state_summary(plane: EventPlane) -> dict[str, Any]:
    """Per model and worker: id, status, epoch and seq, and the sorted router hashes
    the index holds; plus the plane's stats. Taken under the ingest lock, so hashes
    and seqs belong together."""
    out: dict[str, Any] = {"replica": plane.replica_id, "stats": plane.stats(), "models": {}}
    async with plane.core.lock:
        for model, state in list(plane.registry.models.items()):
            workers = {}
            for w in list(state.workers.values()):
                held = await asyncio.to_thread(state.index.worker_router_hashes, w.wid)
                tr = plane.core.tracks.get((model, w.name))
                workers[w.name] = {
                    "wid": w.wid, "status": w.status.value,
                    "hashes": sorted({h for h, _ in held}),
                    "epoch": tr.epoch if tr else None, "seq": tr.seq if tr else None,
                }
            out["models"][model] = workers
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrouter.events",
                                description="Run the Redis event plane ingest for a router's index.")
    p.add_argument("--redis", required=True, help="Redis URL (redis://, rediss://, redis+sentinel://...)")
    p.add_argument("--namespace", default="kvrouter")
    p.add_argument("--model", action="append", required=True, help="NAME:BLOCK_SIZE (repeatable)")
    p.add_argument("--replica-id", default=None)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--heartbeat-ttl", type=float, default=3.0)
    p.add_argument("--snapshot-interval", type=float, default=30.0)
    p.add_argument("--snapshot-min-retention", type=float, default=10.0)
    p.add_argument("--state-file", default=None,
                   help="write the index state (per worker router hashes) and stats here as JSON, "
                        "periodically")
    p.add_argument("--state-interval", type=float, default=0.2)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    models = _parse_models(args.model)

    async def run() -> None:
        registry = Registry()
        for name, bs in models:
            registry.add_model(name, bs)
        plane = make_event_plane(
            registry, args.redis, namespace=args.namespace, replica_id=args.replica_id,
            num_shards=args.num_shards, heartbeat_ttl_s=args.heartbeat_ttl,
            snapshot_interval_s=args.snapshot_interval,
            snapshot_min_retention_s=args.snapshot_min_retention,
        )
        stop = asyncio.Event()
        mainloop.stop_on_signals(stop.set)
        await plane.start()
        try:
            while not stop.is_set():
                if args.state_file:
                    summary = await state_summary(plane)
                    tmp = args.state_file + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump(summary, f)
                    os.replace(tmp, args.state_file)
                try:
                    await asyncio.wait_for(stop.wait(), args.state_interval)
                except TimeoutError:
                    pass
        finally:
            await plane.stop()

    mainloop.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
