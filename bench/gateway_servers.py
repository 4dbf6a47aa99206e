"""Which HTTP server for the router's HTTP front: aiohttp vs uvicorn, on uvloop.

Each server runs in its own process with the front's work shape and nothing else: one
endpoint streams 1000 server-sent events of an OpenAI completion chunk, another answers a
small JSON body. The load generator (aiohttp client, this process) drives each in turn,
rounds interleaved; the server's CPU seconds from /proc give chunks/s and requests/s per
server core. docs/http-front.md reads the result.

    python -m bench.gateway_servers --json bench/results/gateway_servers.json

Needs uvicorn and httptools (the bench extra). Noisy on a shared machine: medians of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.common import machine, table, write_json
from bench.gateway import _cpu_s
from kvrouter.testing.processes import free_port

N_CHUNKS = 1000
CHUNK = {"id": "cmpl-0123456789abcdef", "object": "text_completion", "created": 1,
         "model": "default",
         "choices": [{"index": 0, "text": " word", "logprobs": None, "finish_reason": None}]}


def _sse() -> bytes:
    return b"data: " + json.dumps(CHUNK, separators=(",", ":")).encode() + b"\n\n"


async def _aiohttp(port: int) -> None:
    from aiohttp import web

    async def stream(req: web.Request) -> web.StreamResponse:
        await req.read()
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(req)
        for _ in range(N_CHUNKS):
            await r.write(_sse())
        await r.write(b"data: [DONE]\n\n")
        return r

    async def one(req: web.Request) -> web.Response:
        await req.read()
        return web.Response(body=json.dumps(CHUNK).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/s", stream)
    app.router.add_post("/j", one)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _uvicorn(port: int) -> None:
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/s":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(N_CHUNKS):
                await send({"type": "http.response.body", "body": _sse(), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(CHUNK).encode()})

    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                         access_log=False, loop="none", http="httptools", lifespan="off")
    await uvicorn.Server(cfg).serve()


async def _measure(kind: str, streams: int, requests: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gateway_servers", "--serve", kind,
                             "--port", str(port)])
    try:
        async with aiohttp.ClientSession() as s:
            async def one(path: str) -> None:
                async with s.post(f"http://127.0.0.1:{port}{path}", data=b"{}") as r:
                    async for _ in r.content.iter_any():
                        pass

            deadline = time.monotonic() + 30
            while True:
                try:
                    await one("/j")
                    break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            out = {}
            for path, total, conc in (("/s", streams, 8), ("/j", requests, 16)):
                async def worker(k: int, path: str = path) -> None:
                    for _ in range(k):
                        await one(path)

                c0 = _cpu_s(proc.pid)
                await asyncio.gather(*(worker(total // conc) for _ in range(conc)))
                cpu = _cpu_s(proc.pid) - c0
                units = (total // conc) * conc * (N_CHUNKS if path == "/s" else 1)
                out["chunks_per_core" if path == "/s" else "requests_per_core"] = units / cpu
            return out
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--serve", choices=["aiohttp", "uvicorn"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_aiohttp(args.port) if args.serve == "aiohttp" else _uvicorn(args.port))
        return
    streams, requests = (40, 3000) if args.quick else (120, 9000)
    rounds: dict[str, list[dict[str, float]]] = {"aiohttp": [], "uvicorn": []}
    for _ in range(args.rounds):
        for kind in rounds:
            rounds[kind].append(asyncio.run(_measure(kind, streams, requests)))
    med = {k: {m: sorted(r[m] for r in v)[len(v) // 2] for m in v[0]} for k, v in rounds.items()}
    print(table([[k, v["chunks_per_core"], v["requests_per_core"]] for k, v in med.items()],
                ["server", "chunks/s per core", "requests/s per core"]))
    write_json(args.json, {"benchmark": "gateway_servers", "machine": machine(),
                           "median": med, "rounds": rounds,
                           "notes": "server CPU from /proc (10 ms ticks); shared machine"})


if __name__ == "__main__":
    main()
