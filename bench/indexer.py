"""Indexer benchmark: the Mooncake conversation trace through kvrouter's prefix
index and Dynamo's RadixTree, side by side, in one run.

Each hash_id is one 512-token block (equal ids = equal prefix blocks), so both
indexes get the ids as precomputed block hashes. Requests are assigned to N
workers round robin and, in a second pass, to the worker with the longest match;
every worker keeps what it stored (no eviction), and stores only the blocks past
its cached prefix, with that prefix's last block as parent — the event stream a
real engine would send.

    python -m bench.indexer --quick --json out/indexer.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from bench.common import SHARED, machine, progress, table, write_json
from kvrouter import PrefixIndex

TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"
BATCH = 256  # events per apply_payloads call, like one XREAD batch


@dataclass
class Stored:
    worker: int
    parent: int | None
    hashes: list[int]


def load_trace(path: Path, limit: int | None) -> list[list[int]]:
    out = []
    with path.open() as f:
        for line in f:
            out.append([int(h) + 1 for h in json.loads(line)["hash_ids"]])  # +1: keep 0 free
            if limit and len(out) >= limit:
                break
    return out


def make_events(reqs: list[list[int]], workers: int, mode: str) -> list[Stored]:
    """Per request: the blocks the chosen worker did not yet hold, chained to its prefix."""
    held: list[set[int]] = [set() for _ in range(workers)]
    guide = PrefixIndex(1) if mode == "longest" else None
    events = []
    for i, hashes in enumerate(reqs):
        if guide is None:
            w = i % workers
        else:
            m = guide.find_matches(hashes)
            best = max(m.values(), default=(0, 0, 0))[0]
            ties = [wid for wid, ov in m.items() if ov[0] == best] if best else list(range(workers))
            w = min(ties, key=lambda x: (len(held[x]), x))
        k = 0
        while k < len(hashes) and hashes[k] in held[w]:
            k += 1
        new = hashes[k:]
        if not new:
            continue
        parent = hashes[k - 1] if k else None
        events.append(Stored(w, parent, new))
        held[w].update(new)
        if guide is not None:
            guide.apply_stored(w, new, parent=parent, router_hashes=new)
    return events


def bench_kvrouter(events: list[Stored], queries: list[list[int]]) -> dict[str, Any]:
    payloads = [
        (e.worker, msgpack.packb([{"type": "stored", "hashes": e.hashes, "parent": e.parent,
                                   "router_hashes": e.hashes}], use_bin_type=True))
        for e in events
    ]
    blocks = sum(len(e.hashes) for e in events)
    # Batched ingest: the router's path (one Rust call per XREAD batch).
    gc.collect()
    idx = PrefixIndex(512)
    t0 = time.perf_counter()
    for i in range(0, len(payloads), BATCH):
        idx.apply_payloads(payloads[i : i + BATCH])
    t_batch = time.perf_counter() - t0
    # Per-event ingest through Python, one call per event (like Dynamo's apply_event).
    one = PrefixIndex(512)
    t0 = time.perf_counter()
    for w, p in payloads:
        one.apply_payload(w, p)
    t_single = time.perf_counter() - t0
    assert one.snapshot() == idx.snapshot()
    lat = np.empty(len(queries))
    clock = time.perf_counter_ns
    matched = 0
    for i, q in enumerate(queries):
        t = clock()
        m = idx.find_matches(q)
        lat[i] = clock() - t
        matched += max((v[0] for v in m.values()), default=0)
    t0 = time.perf_counter()
    for i in range(0, len(queries), 256):
        idx.find_matches_batch(queries[i : i + 256])
    t_qbatch = time.perf_counter() - t0
    entries = idx.num_entries()
    return {
        "ingest_blocks_per_s": blocks / t_batch,
        "ingest_events_per_s": len(events) / t_batch,
        "ingest_blocks_per_s_per_event_call": blocks / t_single,
        "query_p50_us": float(np.percentile(lat, 50)) / 1e3,
        "query_p99_us": float(np.percentile(lat, 99)) / 1e3,
        "query_mean_us": float(lat.mean()) / 1e3,
        "queries_per_s": len(queries) / (lat.sum() / 1e9),
        "queries_per_s_batched": len(queries) / t_qbatch,
        "bytes_per_block": idx.memory_bytes() / max(entries, 1),
        "bytes_per_unique_block": idx.memory_bytes() / max(idx.num_nodes(), 1),
        "entries": entries,
        "unique_blocks": idx.num_nodes(),
        "matched_blocks": matched,
    }


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def bench_dynamo(events: list[Stored], queries: list[list[int]]) -> dict[str, Any] | None:
    try:
        from dynamo._core import RadixTree
    except ImportError as err:
        return {"error": f"ai-dynamo-runtime not installed: {err}"}
    bodies = []
    for n, e in enumerate(events):
        data = {"stored": {"parent_hash": e.parent,
                           "blocks": [{"block_hash": h, "tokens_hash": h} for h in e.hashes]}}
        bodies.append((e.worker, json.dumps({"event_id": n, "data": data}).encode()))
    blocks = sum(len(e.hashes) for e in events)
    gc.collect()
    rss0 = rss_bytes()
    tree = RadixTree()
    t0 = time.perf_counter()
    for w, b in bodies:
        tree.apply_event(w, b)
    t_ingest = time.perf_counter() - t0
    rss1 = rss_bytes()
    lat = np.empty(len(queries))
    clock = time.perf_counter_ns
    matched = 0
    for i, q in enumerate(queries):
        t = clock()
        m = tree.find_matches(q)
        lat[i] = clock() - t
        matched += max(m.scores.values(), default=0)
    return {
        "ingest_blocks_per_s": blocks / t_ingest,
        "ingest_events_per_s": len(events) / t_ingest,
        "query_p50_us": float(np.percentile(lat, 50)) / 1e3,
        "query_p99_us": float(np.percentile(lat, 99)) / 1e3,
        "query_mean_us": float(lat.mean()) / 1e3,
        "queries_per_s": len(queries) / (lat.sum() / 1e9),
        "rss_bytes_per_block_approx": max(rss1 - rss0, 0) / max(blocks, 1),
        "matched_blocks": matched,
    }


def run(trace: Path, quick: bool, worker_counts: list[int]) -> dict[str, Any]:
    reqs = load_trace(trace, 3000 if quick else None)
    rng = np.random.default_rng(0)
    qidx = rng.choice(len(reqs), size=min(len(reqs), 2000 if quick else 10000), replace=False)
    queries = [reqs[i] for i in qidx]
    result: dict[str, Any] = {"machine": machine(), "trace": str(trace), "requests": len(reqs),
                              "quick": quick, "runs": {}}
    steps = [(w, mode) for w in worker_counts for mode in ("round_robin", "longest")]
    for n, (workers, mode) in enumerate(steps):
        progress(n, len(steps), "indexer")
        events = make_events(reqs, workers, mode)
        ours = bench_kvrouter(events, queries)
        theirs = bench_dynamo(events, queries)
        run_key = f"{workers}w_{mode}"
        entry: dict[str, Any] = {"kvrouter": ours, "dynamo": theirs,
                                 "events": len(events), "blocks": sum(len(e.hashes) for e in events)}
        if theirs and "error" not in theirs:
            entry["ratio"] = {
                "ingest": ours["ingest_blocks_per_s"] / theirs["ingest_blocks_per_s"],
                "ingest_per_event_call": ours["ingest_blocks_per_s_per_event_call"] / theirs["ingest_blocks_per_s"],
                "query": theirs["query_p50_us"] / ours["query_p50_us"],
                "query_p99": theirs["query_p99_us"] / ours["query_p99_us"],
            }
            if ours["matched_blocks"] != theirs["matched_blocks"]:
                entry["warning"] = "the two indexes disagree on matched blocks"
        result["runs"][run_key] = entry
    progress(len(steps), len(steps), "indexer")
    # Headline keys: 64 workers, longest-match assignment, whole trace indexed.
    head = result["runs"].get(f"{max(worker_counts)}w_longest") or next(iter(result["runs"].values()))
    result["kvrouter"] = head["kvrouter"]
    result["dynamo"] = head["dynamo"]
    result["ratio"] = head.get("ratio", {})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first 3,000 requests (under a minute)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--trace", type=Path, default=TRACE, help="Mooncake-format JSONL trace")
    ap.add_argument("--workers", default="8,64", help="comma-separated worker counts")
    args = ap.parse_args(argv)
    res = run(args.trace, args.quick, [int(x) for x in args.workers.split(",")])
    rows = []
    for key, r in res["runs"].items():
        k, d = r["kvrouter"], r["dynamo"] or {}
        rows.append([key, r["blocks"], k["ingest_blocks_per_s"] / 1e6, d.get("ingest_blocks_per_s", float("nan")) / 1e6,
                     r.get("ratio", {}).get("ingest", float("nan")), k["query_p50_us"], k["query_p99_us"],
                     d.get("query_p50_us", float("nan")), r.get("ratio", {}).get("query", float("nan")),
                     k["bytes_per_block"]])
    print(table(rows, ["run", "blocks", "ours Mblk/s", "dynamo Mblk/s", "ingest x", "ours p50 us",
                       "ours p99 us", "dynamo p50 us", "query x", "B/block"]))
    print(f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
