"""Routing service benchmark.

(a) in-process `Scheduler.route()` latency (hash + match + score + reserve in one Rust
    call) for 1K- and 8K-token prompts, 64 and 256 workers, ~1M indexed blocks;
(b) gRPC decisions/s and latency against a `kvrouter serve` subprocess, with the load
    generator in another process: unary at saturation and at a fixed offered rate
    (half the saturation rate), and RouteStream (batched, pipelined) at saturation.

    python -m bench.service --quick --json out/service.json

Targets are reported, never asserted: in-process p99 <= 50us (8K tokens, 256 workers,
1M blocks); unary >= 5K decisions/s per server core with p99 <= 2ms at half that rate;
streaming >= 50K decisions/s (issue 14). With more than one core the server is pinned to
core 0 and the load generator to the others (so per-core figures are per server core);
server CPU-seconds per decision are reported beside the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, summary, write_json
from kvrouter import PrefixIndex, Scheduler, hash_blocks
from kvrouter.testing.processes import RouterProcess, start_router

BLOCK = 16
VOCAB = 32000
TOTAL_BLOCKS = 1_000_000


# ---------------------------------------------------------------------- (a) in-process
def build_index(workers: int, total_blocks: int, prompts: list[np.ndarray], seed: int,
                ) -> PrefixIndex:
    """~total_blocks (worker, block) pairs of unrelated chains, plus prefixes of the benchmark
    prompts on a few workers each so that matching walks deep."""
    rng = np.random.default_rng(seed)
    index = PrefixIndex(BLOCK)
    per_worker = total_blocks // workers
    chain = 512
    for w in range(workers):
        hashes = rng.integers(1, 2**63, size=per_worker, dtype=np.uint64).tolist()
        for start in range(0, per_worker, chain):
            part = hashes[start:start + chain]
            index.apply_stored(w, part, None, router_hashes=part)
    for p in prompts:
        hs = hash_blocks(p, BLOCK)
        for w in rng.choice(workers, size=min(8, workers), replace=False):
            k = int(rng.integers(1, len(hs) + 1))
            index.apply_stored(int(w), hs[:k], None, router_hashes=hs[:k])
    return index


def bench_inproc(workers: int, tokens: int, iters: int, seed: int = 0,
                 total_blocks: int = TOTAL_BLOCKS) -> dict[str, Any]:
    rng = np.random.default_rng(seed + tokens + workers)
    prompts = [rng.integers(0, VOCAB, size=tokens, dtype=np.uint32) for _ in range(32)]
    t0 = time.perf_counter()
    index = build_index(workers, total_blocks, prompts, seed)
    build_s = time.perf_counter() - t0
    sched = Scheduler(index, seed=seed)
    for w in range(workers):
        sched.add_worker(w)
    for i in range(min(200, iters)):  # warm-up
        sched.route(prompts[i % len(prompts)], reserve=False)
    lat = np.empty(iters, dtype=np.float64)
    cpu = np.empty(iters, dtype=np.float64)
    overlap = 0
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for i in range(iters):
        rid = f"b{i}"
        p = prompts[i % len(prompts)]
        t, c = clock(), cpu_clock()
        d = sched.route(p, request_id=rid, expected_output_tokens=128)
        cpu[i] = cpu_clock() - c
        lat[i] = clock() - t
        overlap += d.overlap_blocks
        sched.release(rid)  # untimed: keeps the load flat across iterations
    us = lat / 1e3
    return {"workers": workers, "prompt_tokens": tokens, "indexed_blocks": index.num_entries(),
            "iters": iters, "build_s": round(build_s, 3),
            "mean_overlap_blocks": overlap / iters, **{f"{k}_us": v for k, v in
                                                      summary(us).items()},
            **_tails(us, cpu / 1e3)}


def _tails(wall_us: np.ndarray, cpu_us: np.ndarray, runs: int = 10) -> dict[str, float]:
    """What separates preemption from the route's own tail on a shared machine: the p99 of
    thread-CPU time (the calling thread's own work; the route runs on it), and the median
    and lowest of the wall p99s of `runs` consecutive runs (a preempted run inflates its own
    p99 only)."""
    per_run = [float(np.percentile(r, 99)) for r in np.array_split(wall_us, runs) if len(r)]
    return {"cpu_p50_us": float(np.percentile(cpu_us, 50)),
            "cpu_p99_us": float(np.percentile(cpu_us, 99)),
            "run_p99_median_us": float(np.median(per_run)),
            "run_p99_min_us": min(per_run)}


# ---------------------------------------------------------------------- (c) scale
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_scale(workers: int, total_blocks: int, iters: int, tokens: int = 8192,
                seed: int = 5) -> dict[str, Any]:
    """A big fleet in one index: memory per indexed block, route latency, snapshot size
    and the cold start of a replica that loads it."""
    import gc

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, size=tokens, dtype=np.uint32) for _ in range(32)]
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    index = build_index(workers, total_blocks, prompts, seed)
    build_s = time.perf_counter() - t0
    entries = index.num_entries()
    rss_index = _rss() - rss0
    sched = Scheduler(index, seed=seed)
    for w in range(workers):
        sched.add_worker(w)
    for i in range(min(200, iters)):
        sched.route(prompts[i % len(prompts)], reserve=False)
    lat = np.empty(iters, dtype=np.float64)
    cpu = np.empty(iters, dtype=np.float64)
    for i in range(iters):
        p = prompts[i % len(prompts)]
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        sched.route(p, request_id=f"s{i}", expected_output_tokens=128)
        cpu[i] = time.thread_time_ns() - c
        lat[i] = time.perf_counter_ns() - t
        sched.release(f"s{i}")
    t0 = time.perf_counter()
    snap = index.snapshot()
    snapshot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = PrefixIndex.from_snapshot(snap)
    cold_start_s = time.perf_counter() - t0
    assert restored.num_entries() == entries
    return {"workers": workers, "indexed_blocks": entries, "build_s": round(build_s, 2),
            "rss_bytes": rss_index, "bytes_per_block": rss_index / entries,
            "snapshot_bytes": len(snap), "snapshot_s": round(snapshot_s, 3),
            "cold_start_s": round(cold_start_s, 3),
            **{f"route_{k}_us": v for k, v in summary(lat / 1e3).items()},
            **{f"route_{k}": v for k, v in _tails(lat / 1e3, cpu / 1e3).items()}}


# ---------------------------------------------------------------------- (b) gRPC
def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def start_server(workdir: Path) -> RouterProcess:
    """`kvrouter serve` of the installed package on a free port, serving when this returns."""
    # Short leases: the load generator never releases, expiry keeps the load bounded.
    return start_router(workdir, None, ("--lease-s", "2", "--heartbeat-timeout-s", "0",
                                        "--model", f"default,block_size={BLOCK}"), timeout=30,
                        metrics=True)


def _scrape(metrics_port: int) -> list[Any]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def heap_trims(metrics_port: int) -> float:
    """The server's kvrouter_heap_trims_total (each one a full GC pass and malloc_trim in
    the event loop: server/memory.py)."""
    return sum(smp.value for fam in _scrape(metrics_port) if fam.name == "kvrouter_heap_trims"
               for smp in fam.samples if smp.name.endswith("_total"))


def decision_buckets(metrics_port: int) -> dict[float, float]:
    """Cumulative counts of the server's kvrouter_decision_seconds histogram (the time
    decide() takes inside the handler, without gRPC queueing/transport), by upper bound."""
    out: dict[float, float] = {}
    for fam in _scrape(metrics_port):
        if fam.name == "kvrouter_decision_seconds":
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    le = float(smp.labels["le"])
                    out[le] = out.get(le, 0.0) + smp.value
    return out


def server_quantiles(before: dict[float, float], after: dict[float, float],
                     qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, float | None]:
    """Upper bucket bounds (ms) of the server-side decision quantiles between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, float | None] = {"server_decisions": total}
    for q in qs:
        le = next((b for b, c in zip(bounds, counts, strict=True) if total and c >= q * total),
                  None)
        out[f"server_decide_p{round(q * 100)}_ms_at_most"] = None if le is None else le * 1e3
    return out


def setup_fleet(target: str, workers: int, prompts: list[list[int]]) -> None:
    from kvrouter.client import RouterClient
    from kvrouter.events.codec import encode_payload
    from kvrouter.events.model import BlockStored

    with RouterClient(target) as c:
        rng = np.random.default_rng(1)
        for w in range(workers):
            c.register_worker("default", f"w{w}", block_size=BLOCK)
        for i, p in enumerate(prompts):
            for w in rng.choice(workers, size=4, replace=False):
                k = int(rng.integers(1, len(p) // BLOCK + 1))
                ev = BlockStored(hashes=tuple(range(i * 10_000 + 1, i * 10_000 + k + 1)),
                                 token_ids=tuple(p[: k * BLOCK]), block_size=BLOCK)
                c.publish_events("default", f"w{w}", "bench", i, encode_payload([ev]))


async def _unary_saturate(target: str, reqs: list[bytes], seconds: float,
                          concurrency: int) -> dict[str, Any]:
    import grpc

    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
    parsed = [router_pb2.RouteRequest.FromString(r) for r in reqs]
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    errors = 0

    async def worker(k: int) -> None:
        nonlocal errors
        stub = stubs[k % len(stubs)]
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                await stub.Route(parsed[i % len(parsed)])
            except grpc.RpcError:
                errors += 1
            lat.append(time.perf_counter() - t)
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"rps": len(lat) / wall, "errors": errors, "concurrency": concurrency,
            **{f"{k}_ms": v for k, v in summary(np.array(lat) * 1e3).items()}}


async def _unary_fixed_rate(target: str, reqs: list[bytes], seconds: float,
                            rate: float) -> dict[str, Any]:
    """Open loop: request i is due at t0 + i/rate; latency counts from when it was due, so a
    stalled server shows up in the tail instead of lowering the offered rate."""
    import grpc

    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
    parsed = [router_pb2.RouteRequest.FromString(r) for r in reqs]
    lat: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        nonlocal errors
        try:
            await stubs[i % len(stubs)].Route(parsed[i % len(parsed)])
        except grpc.RpcError:
            errors += 1
        lat.append(time.perf_counter() - due)

    n = int(seconds * rate)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    wall = time.perf_counter() - t0
    for ch in channels:
        await ch.close()
    return {"offered_rps": rate, "achieved_rps": n / wall, "errors": errors,
            **{f"{k}_ms": v for k, v in summary(np.array(lat) * 1e3).items()}}


async def _stream_saturate(target: str, reqs: list[bytes], seconds: float, streams: int,
                           batch: int, inflight: int) -> dict[str, Any]:
    import grpc

    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc

    channel = grpc.aio.insecure_channel(target)
    stub = router_pb2_grpc.RouterStub(channel)
    items = [router_pb2.RouteStreamItem(route=router_pb2.RouteRequest.FromString(r))
             for r in reqs]
    msg_lat: list[float] = []
    decisions = 0
    errors = 0
    stop = time.perf_counter() + seconds

    async def one_stream(k: int) -> None:
        nonlocal decisions, errors
        call = stub.RouteStream()
        sent: dict[int, float] = {}
        window = asyncio.Semaphore(inflight)
        done_sending = asyncio.Event()

        async def reader() -> None:
            nonlocal decisions, errors
            async for resp in call:
                msg_lat.append(time.perf_counter() - sent.pop(resp.seq))
                decisions += len(resp.results)
                errors += sum(1 for r in resp.results if r.HasField("error"))
                window.release()
                if done_sending.is_set() and not sent:
                    break

        rtask = asyncio.create_task(reader())
        seq = 0
        while time.perf_counter() < stop:
            await window.acquire()
            seq += 1
            chunk = [items[(seq * batch + j) % len(items)] for j in range(batch)]
            sent[seq] = time.perf_counter()
            await call.write(router_pb2.RouteStreamRequest(seq=seq, items=chunk))
        done_sending.set()
        await call.done_writing()
        await rtask

    t0 = time.perf_counter()
    await asyncio.gather(*(one_stream(k) for k in range(streams)))
    wall = time.perf_counter() - t0
    await channel.close()
    return {"rps": decisions / wall, "errors": errors, "streams": streams, "batch": batch,
            "inflight_messages": inflight,
            **{f"message_{k}_ms": v for k, v in summary(np.array(msg_lat) * 1e3).items()}}


SERVER_CORES = {0}


def _loadgen_cores() -> set[int]:
    cores = os.sched_getaffinity(0) - SERVER_CORES
    return cores or os.sched_getaffinity(0)


def pin_server(pid: int) -> bool:
    """Pin every thread of the server to SERVER_CORES (False on a single-core machine)."""
    if len(os.sched_getaffinity(0)) < 2:
        return False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), SERVER_CORES)
        except OSError:  # a thread that just exited
            pass
    return True


def _loadgen(kind: str, args: dict[str, Any], out: Any) -> None:
    """Runs in a separate process (spawn): one measurement, result through the queue."""
    os.sched_setaffinity(0, _loadgen_cores())  # before gRPC starts its threads
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    fns: dict[str, Any] = {"unary": _unary_saturate, "fixed": _unary_fixed_rate,
                           "stream": _stream_saturate}
    fn = fns[kind]
    try:
        out.put(runner(fn(**args)))
    except Exception as e:  # reported in the JSON rather than hanging the parent
        out.put({"error": repr(e)})


def run_loadgen(kind: str, server_pid: int, **args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loadgen, args=(kind, args, q))
    cpu0 = _proc_cpu_s(server_pid)
    t0 = time.perf_counter()
    p.start()
    result: dict[str, Any] = q.get(timeout=float(args.get("seconds", 10)) + 120)
    wall = time.perf_counter() - t0
    p.join(30)
    # Server CPU over the loadgen's life (includes its ~1s start): busy cores, a lower bound.
    cpu = _proc_cpu_s(server_pid) - cpu0
    result["server_cpu_cores"] = round(cpu / wall, 3)
    decisions = result.get("rps", result.get("achieved_rps", 0.0)) * float(args.get("seconds", 0))
    if decisions:  # per decision: the figure a faster Python path lowers, whatever the load
        result["server_cpu_us_per_decision"] = round(cpu / decisions * 1e6, 2)
    return result


def bench_grpc(quick: bool, workers: int = 64, prompt_tokens: int = 1024) -> dict[str, Any]:
    from kvrouter.client import route_request

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, size=prompt_tokens, dtype=np.uint32).tolist()
               for _ in range(64)]
    # Requests share a prefix of a known prompt then diverge, like multi-turn traffic.
    reqs = [route_request(prompts[i % 64][: prompt_tokens // 2] + prompts[(i * 7) % 64]
                          [: prompt_tokens // 2], "default",
                          expected_output_tokens=128).SerializeToString()
            for i in range(256)]
    seconds = 3.0 if quick else 10.0
    workdir = Path(tempfile.mkdtemp(prefix="kvrouter-bench-service-"))
    server = start_server(workdir)
    target = server.target
    pinned = pin_server(server.pid)
    try:
        setup_fleet(target, workers, prompts)
        trims0 = heap_trims(server.metrics_port)
        unary = run_loadgen("unary", server.pid, target=target, reqs=reqs, seconds=seconds,
                            concurrency=64)
        half = max(100.0, float(unary.get("rps", 0.0)) / 2)
        b0 = decision_buckets(server.metrics_port)
        fixed = run_loadgen("fixed", server.pid, target=target, reqs=reqs, seconds=seconds,
                            rate=half)
        # The decision's own latency in the server, apart from what the client observes.
        fixed.update(server_quantiles(b0, decision_buckets(server.metrics_port)))
        stream = run_loadgen("stream", server.pid, target=target, reqs=reqs, seconds=seconds,
                             streams=4, batch=32, inflight=4)
        stream1 = run_loadgen("stream", server.pid, target=target, reqs=reqs,
                              seconds=seconds / 2, streams=4, batch=1, inflight=16)
        trims = heap_trims(server.metrics_port) - trims0
    finally:
        server.stop(15.0)
        err = server.logs()
        shutil.rmtree(workdir, ignore_errors=True)
    cores = unary.get("server_cpu_cores") or float("nan")
    return {
        "workers": workers, "prompt_tokens": prompt_tokens, "seconds_per_phase": seconds,
        "server_pinned_cores": sorted(SERVER_CORES) if pinned else None,
        "loadgen_cores": sorted(_loadgen_cores()) if pinned else None,
        "unary_server_cpu_us_per_decision": unary.get("server_cpu_us_per_decision"),
        "stream_server_cpu_us_per_decision": stream.get("server_cpu_us_per_decision"),
        "unary_saturation": unary, "unary_half_load": fixed, "stream_batched": stream,
        "stream_unbatched": stream1,
        "unary_rps": unary.get("rps"),
        "unary_rps_per_server_core": (unary["rps"] / cores) if "rps" in unary and cores
        else None,
        "unary_p99_ms_at_half_load": fixed.get("p99_ms"),
        "unary_server_decide_p99_ms_at_most_at_half_load":
            fixed.get("server_decide_p99_ms_at_most"),
        "stream_rps": stream.get("rps"),
        "stream_rps_unbatched": stream1.get("rps"),
        "server_heap_trims": trims,
        "server_stderr_tail": err[-2000:],
    }


# ---------------------------------------------------------------------- main
def _f(v: Any, digits: int = 0) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short run (well under 2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--skip-inproc", action="store_true")
    ap.add_argument("--skip-scale", action="store_true", help="skip the 1,024-worker, 10M-block case")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {"benchmark": "service", "quick": args.quick, "machine": machine(),
                              "targets": {"inproc_p99_us_8k_256w": 50, "unary_rps_per_core": 5000,
                                          "unary_p99_ms_at_half_load": 2.0,
                                          "stream_rps": 50000}}
    t0 = time.perf_counter()
    if not args.skip_inproc:
        iters = 3000 if args.quick else 30000
        inproc: dict[str, Any] = {"cases": []}
        for workers in (64, 256):
            for tokens in (1024, 8192):
                r = bench_inproc(workers, tokens, iters)
                inproc["cases"].append(r)
                key = f"{tokens // 1024}k_{workers}w"
                inproc[f"route_p50_us_{key}"] = r["p50_us"]
                inproc[f"route_p99_us_{key}"] = r["p99_us"]
                inproc[f"route_cpu_p99_us_{key}"] = r["cpu_p99_us"]
                print(f"inproc {key}: p50 {r['p50_us']:.1f}us p99 {r['p99_us']:.1f}us "
                      f"(thread CPU p99 {r['cpu_p99_us']:.1f}us, run p99s median "
                      f"{r['run_p99_median_us']:.1f}us) "
                      f"(overlap {r['mean_overlap_blocks']:.0f} blocks, "
                      f"{r['indexed_blocks']} indexed)", flush=True)
        result["inproc"] = inproc
    if not args.skip_scale:
        sc = bench_scale(1024, 10_000_000, 2000 if args.quick else 20000)
        result["scale"] = {**sc, "bytes_per_block_10m": sc["bytes_per_block"],
                           "route_p99_us_10m": sc["route_p99_us"],
                           "route_cpu_p99_us_10m": sc["route_cpu_p99_us"]}
        print(f"scale 1024w {sc['indexed_blocks']} blocks: {sc['bytes_per_block']:.0f} B/block, route p50 "
              f"{sc['route_p50_us']:.1f}us p99 {sc['route_p99_us']:.1f}us, snapshot "
              f"{sc['snapshot_bytes'] / 2**20:.0f} MiB, cold start {sc['cold_start_s']:.2f}s", flush=True)
    if not args.skip_grpc:
        g = bench_grpc(args.quick)
        result["grpc"] = g
        print(f"grpc unary: {_f(g['unary_rps'])}/s "
              f"(server busy cores {g['unary_saturation'].get('server_cpu_cores')}, "
              f"{g['unary_server_cpu_us_per_decision']} us CPU/decision), "
              f"p99 at half load {_f(g['unary_p99_ms_at_half_load'], 2)}ms (server-side "
              f"decide p99 <= {g['unary_server_decide_p99_ms_at_most_at_half_load']}ms); stream "
              f"{_f(g['stream_rps'])}/s batched, {_f(g['stream_rps_unbatched'])}/s unbatched",
              flush=True)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
