"""Event-plane throughput with and without signed events (kvrouter.security.signing), side by
side in one run: bench.events' throughput phase (64 publishers in a separate process over
Redis, one RedisPlane ingesting), alternating unsigned and signed rounds.

    python -m bench.signed_events --quick --json bench/results/signed_events-quick.json

Signed: every publisher tags each entry and heartbeat field with its worker key (HMAC-SHA256
over the entry bytes), the plane derives each worker's key from the secret and checks every
entry before applying it (require_signed). Reported: ingest blocks/s per round, medians per
mode and the signed/unsigned ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import uuid
from typing import Any
from unittest import mock

import bench.events as ev
from bench.common import machine, table, write_json
from kvrouter.events import metrics as event_metrics
from kvrouter.events.plane import make_event_plane
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.registry import Registry
from kvrouter.security.signing import Signer, derive_worker_key


def _signed_publisher_main(args: dict[str, Any], conn: Any) -> None:
    """bench.events' publisher process, each publisher with its own worker key."""
    secret = bytes.fromhex(args["secret"])
    plain = ev.redis_publisher

    def signed(redis: Any, model: str, worker: str, **kw: Any) -> Any:
        return plain(redis, model, worker, signer=Signer(derive_worker_key(secret, model, worker)),
                     **kw)

    ev.redis_publisher = signed
    ev._publisher_main(args, conn)


async def _round(a: argparse.Namespace, lags: ev.LagSamples, secret_file: str | None,
                 secret: bytes, seed: int) -> dict[str, Any]:
    ns = "kvrsig-" + uuid.uuid4().hex[:8]
    reg = Registry()
    reg.add_model(ev.MODEL, 16)
    opts: dict[str, Any] = {"signing_secret_file": secret_file} if secret_file else {}
    plane = make_event_plane(reg, a.redis, namespace=ns, num_shards=a.shards, snapshot_interval_s=0,
                             heartbeat_ttl_s=3600.0, max_stream_len=None, replica_id="bench-sig",
                             **opts)
    assert isinstance(plane, RedisPlane)
    await plane.start()
    per_pub = max(1, a.blocks // (a.publishers * a.blocks_per_event))
    args = {"redis": a.redis, "ns": ns, "shards": a.shards, "publishers": a.publishers,
            "blocks_per_event": a.blocks_per_event, "block_size": 16, "seed": seed,
            "prefix": "w", "events_per_publisher": per_pub, "tokens": False,
            "rate_blocks_per_s": 0, "secret": secret.hex()}
    target = _signed_publisher_main if secret_file else ev._publisher_main
    try:
        with mock.patch.object(ev, "_publisher_main", target):
            r = await ev._run_phase(plane, lags, args, per_pub * a.publishers * a.blocks_per_event)
        r["rejected"] = plane.core.stats.malformed.get("bad_signature", 0) + \
            plane.core.stats.malformed.get("unsigned", 0)
    finally:
        await plane.stop()
        client = ev.make_client(ev.RedisConfig(a.redis))
        await ev.delete_namespace(client, ns)
        await client.aclose()
    return r


async def main_async(a: argparse.Namespace, lags: ev.LagSamples, secret_file: str) -> dict[str, Any]:
    secret = bytes.fromhex(open(secret_file).read().strip())
    rounds: dict[str, list[dict[str, Any]]] = {"unsigned": [], "signed": []}
    for i in range(a.rounds):  # interleaved: the machine's load drifts
        for mode in ("unsigned", "signed"):
            r = await _round(a, lags, secret_file if mode == "signed" else None, secret, seed=i + 1)
            rounds[mode].append(r)
            ev_rate = r["blocks_per_s"]
            print(f"round {i} {mode}: {ev_rate:,.0f} blocks/s ({r['blocks']} blocks, "
                  f"{r['rejected']} rejected)", flush=True)
    med = {m: statistics.median(r["blocks_per_s"] for r in rs) for m, rs in rounds.items()}
    return {"machine": machine(), "publishers": a.publishers, "shards": a.shards,
            "blocks_per_event": a.blocks_per_event, "blocks_per_round": a.blocks,
            "rounds": rounds,
            "unsigned_blocks_per_s_p50": med["unsigned"], "signed_blocks_per_s_p50": med["signed"],
            "signed_over_unsigned": med["signed"] / med["unsigned"],
            "rejected": sum(r["rejected"] for rs in rounds.values() for r in rs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--quick", action="store_true", help="about two minutes")
    p.add_argument("--json", default=None)
    p.add_argument("--publishers", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--blocks-per-event", type=int, default=16)
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args()
    a.blocks = a.blocks or (262_144 if a.quick else 1_048_576)
    a.rounds = a.rounds or (3 if a.quick else 5)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".secret") as f:
        f.write(secrets.token_bytes(32).hex())
        f.flush()
        lags = ev.LagSamples(event_metrics.INGEST_LAG)
        with mock.patch.object(event_metrics, "INGEST_LAG", lags):
            result = asyncio.run(main_async(a, lags, f.name))
    print(table([("unsigned blocks/s p50", result["unsigned_blocks_per_s_p50"]),
                 ("signed blocks/s p50", result["signed_blocks_per_s_p50"]),
                 ("signed / unsigned", result["signed_over_unsigned"]),
                 ("entries rejected", result["rejected"])], ["metric", "value"]))
    write_json(a.json, result)


if __name__ == "__main__":
    main()
