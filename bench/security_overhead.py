"""What TLS and authentication cost on the router's hot path, side by side in one run:
unary Route at saturation and RouteStream (batches of 32) against `kvrouter serve`
subprocesses that differ only in security: plaintext without auth (the default), bearer
tokens on loopback (the access interceptor), and TLS with tokens.

    python -m bench.security_overhead --quick --json bench/results/security_overhead-quick.json

The load generator runs in its own process (spawn). Certificates are made for the run
(tests/security_helpers.py's way, with the `cryptography` package of the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import machine, summary, table, write_json
from kvrouter.security.channels import ClientSecurity
from kvrouter.security.tls import TlsFiles
from kvrouter.testing.processes import start_router

WORKERS = 16
BLOCK = 16


async def _unary(target: str, security: ClientSecurity, reqs: list[bytes], seconds: float,
                 concurrency: int) -> dict[str, Any]:
    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    channels = [security.aio_channel(target) for _ in range(4)]
    stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
    parsed = [router_pb2.RouteRequest.FromString(r) for r in reqs]
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                await stubs[k % 4].Route(parsed[i % len(parsed)])
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t)
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"rps": len(lat) / wall, "errors": errors,
            **{f"{k}_ms": v for k, v in summary(np.array(lat) * 1e3).items()}}


async def _stream(target: str, security: ClientSecurity, reqs: list[bytes], seconds: float,
                  batch: int) -> dict[str, Any]:
    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    channel = security.aio_channel(target)
    call = router_pb2_grpc.RouterStub(channel).RouteStream()
    items = [router_pb2.RouteStreamItem(route=router_pb2.RouteRequest.FromString(r)) for r in reqs]
    decisions = errors = 0
    t0 = time.perf_counter()
    seq = 0
    while time.perf_counter() - t0 < seconds:
        seq += 1
        await call.write(router_pb2.RouteStreamRequest(
            seq=seq, items=[items[(seq * batch + j) % len(items)] for j in range(batch)]))
        resp = await call.read()
        decisions += len(resp.results)
        errors += sum(1 for r in resp.results if r.HasField("error"))
    wall = time.perf_counter() - t0
    await call.done_writing()
    await channel.close()
    return {"rps": decisions / wall, "errors": errors, "batch": batch}


def _loadgen(kind: str, args: dict[str, Any], out: Any) -> None:
    fn: Any = {"unary": _unary, "stream": _stream}[kind]
    try:
        out.put(asyncio.run(fn(**args)))
    except Exception as e:  # reported in the JSON rather than hanging the parent
        out.put({"error": repr(e)})


def _run(kind: str, **args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loadgen, args=(kind, args, q))
    p.start()
    result: dict[str, Any] = q.get(timeout=float(args["seconds"]) + 120)
    p.join(30)
    return result


def _pki(work: Path) -> tuple[Path, Path, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.security_helpers import Pki

    pki = Pki.create(work / "pki")
    cert, key = pki.issue("router", server=True)
    return pki.ca, cert, key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--json", default=None)
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args()
    seconds = 3.0 if a.quick else 10.0
    rounds = a.rounds or (2 if a.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="kvrouter-bench-security-"))
    ca, cert, key = _pki(work)
    token = secrets.token_urlsafe(24)
    (work / "auth.yaml").write_text(yaml.safe_dump({"principals": [
        {"name": "bench", "roles": ["client", "worker"], "token": token,
         "workers": [f"w{i}" for i in range(WORKERS)]}]}))
    modes: dict[str, tuple[dict[str, Any], ClientSecurity]] = {
        "plaintext": ({}, ClientSecurity()),
        "token": ({"auth_file": str(work / "auth.yaml")}, ClientSecurity(token=token)),
        "tls+token": ({"auth_file": str(work / "auth.yaml"), "tls_cert": str(cert),
                       "tls_key": str(key)},
                      ClientSecurity(tls=TlsFiles(ca=ca), token=token)),
    }
    from kvrouter.client import RouterClient, route_request

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 32000, size=1024, dtype=np.uint32).tolist() for _ in range(32)]
    reqs = [route_request(prompts[i % 32], "default", expected_output_tokens=128,
                          dry_run=True).SerializeToString() for i in range(128)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(rounds):  # interleaved: this machine's load drifts
        for mode, (router_cfg, sec) in modes.items():
            rp = start_router(work / f"{mode}-{r}", {"router": {**router_cfg,
                                                               "heartbeat_timeout_s": 0}},
                              security=ClientSecurity(tls=sec.tls))
            try:
                with RouterClient(rp.target, security=sec) as c:
                    for i in range(WORKERS):
                        c.register_worker("default", f"w{i}")
                unary = _run("unary", target=rp.target, security=sec, reqs=reqs,
                             seconds=seconds, concurrency=64)
                stream = _run("stream", target=rp.target, security=sec, reqs=reqs,
                              seconds=seconds, batch=32)
            finally:
                rp.stop()
            runs[mode].append({"unary": unary, "stream": stream})
            print(f"round {r} {mode}: unary {unary.get('rps', 0):,.0f}/s p99 "
                  f"{unary.get('p99_ms', float('nan')):.2f} ms, stream {stream.get('rps', 0):,.0f}/s",
                  flush=True)

    def med(mode: str, kind: str, key: str) -> float:
        return statistics.median(x[kind].get(key, float("nan")) for x in runs[mode])

    result: dict[str, Any] = {"machine": machine(), "seconds_per_phase": seconds,
                              "rounds": rounds, "runs": runs}
    rows = []
    for mode in modes:
        row = {"unary_rps_p50": med(mode, "unary", "rps"),
               "unary_p50_ms": med(mode, "unary", "p50_ms"),
               "unary_p99_ms": med(mode, "unary", "p99_ms"),
               "stream_rps_p50": med(mode, "stream", "rps")}
        result[mode] = row
        rows.append((mode, row["unary_rps_p50"], row["unary_p50_ms"], row["unary_p99_ms"],
                     row["stream_rps_p50"]))
    base = result["plaintext"]
    for mode in ("token", "tls+token"):
        result[mode]["unary_rps_ratio"] = result[mode]["unary_rps_p50"] / base["unary_rps_p50"]
        result[mode]["stream_rps_ratio"] = result[mode]["stream_rps_p50"] / base["stream_rps_p50"]
    print(table(rows, ["mode", "unary/s", "p50 ms", "p99 ms", "stream/s"]))
    write_json(a.json, result)


if __name__ == "__main__":
    main()
