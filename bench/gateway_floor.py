"""What receiving the engine's gRPC stream costs a Python process, before any routing.

bench/gateway's streamed-chunks-per-core figure is the router's whole CPU per SSE event,
and each event is one Engine.Generate stream message the router received with grpc.aio.
This bench measures that receive alone: a grpc.aio client on uvloop (as in the router)
runs the same streams against the same simulated engine (real time, 128 streams, a 64-token
prompt, 2000 tokens each) directly and does nothing with the messages but count them; its
own CPU time over three windows gives messages per client core, the ceiling of chunks per
router core while each chunk is one gRPC message.

    python -m bench.gateway_floor --json bench/results/gateway_floor.json

Noisy on a shared machine: three windows, the median reported; never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from bench.common import machine, write_json
from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.testing.processes import start_router, start_sim_engine


async def windows(address: str, concurrency: int, seconds: float, n: int,
                  ) -> list[dict[str, float]]:
    channel = grpc.aio.insecure_channel(address)
    stub = engine_pb2_grpc.EngineStub(channel)
    le = np.arange(1, 65, dtype="<u4").tobytes()
    messages = 0
    stop = False

    async def client() -> None:
        nonlocal messages
        while not stop:
            req = engine_pb2.GenerateRequest(
                request_id=uuid.uuid4().hex, token_ids_le=le,
                sampling=common_pb2.SamplingParams(max_tokens=2000, ignore_eos=True))
            async for _ in stub.Generate(req):
                messages += 1
                if stop:
                    break

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(2.0)  # every stream under way
    out = []
    for _ in range(n):
        m0, c0, t0 = messages, time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        m, cpu, wall = messages - m0, time.process_time() - c0, time.monotonic() - t0
        out.append({"messages": m, "wall_s": wall, "client_cpu_s": cpu,
                    "messages_per_s": m / wall, "client_cores_used": cpu / wall,
                    "messages_per_core": m / cpu if cpu else float("nan"),
                    "cpu_us_per_message": 1e6 * cpu / m if m else float("nan")})
    stop = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvrouter-gateway-floor-"))
    try:
        # the engine registers with a router (its KV events go there, as in bench/gateway);
        # the client calls the engine directly
        router = start_router(work / "router", {"router": {"heartbeat_timeout_s": 60.0}})
        try:
            engine = start_sim_engine(work, "sim-stream", router=router.target,
                                      args=("--time-scale", "1.0"))
            try:
                runs = uvloop.run(windows(engine.address, args.concurrency, args.seconds, 3))
            finally:
                engine.stop()
        finally:
            router.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mid = sorted(runs, key=lambda r: r["messages_per_core"])[1]
    result: dict[str, Any] = {
        "benchmark": "gateway_floor", "machine": machine(), "concurrency": args.concurrency,
        "messages_per_core": mid["messages_per_core"],
        "cpu_us_per_message": mid["cpu_us_per_message"],
        "runs_messages_per_core": [r["messages_per_core"] for r in runs], "windows": runs,
        "notes": "grpc.aio client on uvloop receiving Engine.Generate streams from the "
                 "simulated engine and only counting them; its CPU per message bounds the "
                 "router's streamed chunks per core (bench/gateway) from above"}
    print(f"gRPC stream receive: {mid['messages_per_core']:.0f} messages per client core "
          f"({mid['cpu_us_per_message']:.1f} us CPU each; windows "
          f"{', '.join(f'{r:.0f}' for r in result['runs_messages_per_core'])})")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
