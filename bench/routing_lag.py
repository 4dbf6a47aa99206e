"""Where the kv policy loses cache hits under load: event lag or the load term.

Replays a trace through the fleet simulator with a proxy around its scheduler that
also tracks the requests routed but not yet prefilled (whose blocks no KV event has
reported yet). For every decision it counts:

* lag: some worker had a longer prefix of the prompt in flight than any worker's
  indexed prefix, and the chosen worker was not one of them (the blocks it missed);
* load: a worker had a longer indexed prefix than the chosen one (the load term
  outweighed the hit).

Run it with in-flight prefixes off (`--pending-ttl 0`, the router before them) and on
(the default) to see what they recover.

    python -m bench.routing_lag --speedups 1,2,4,8 --pending-ttl 0
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import table
from kvrouter._core import Decision, PrefixIndex, Scheduler
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.fleet import (
    FleetConfig,
    FleetSimulator,
    SchedulerWeights,
    load_mooncake,
    pooled_lru,
    prepare,
    trace_hashes,
)
from kvrouter.fleet.traces import MOONCAKE_CONVERSATION, MOONCAKE_SYNTHETIC


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LagProbe:
    """The scheduler, with every decision explained and classified (see the module doc)."""

    def __init__(self, inner: Scheduler, index: PrefixIndex) -> None:
        self._inner = inner
        self._index = index
        self.in_flight: dict[str, tuple[int, list[int]]] = {}  # request id -> (worker, hashes)
        self.counts: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def route_hashes(self, hashes: Sequence[int], prompt_tokens: int, **kw: Any) -> Decision:
        indexed = {w: ov[0] for w, ov in self._index.find_matches(hashes).items()}
        d = self._inner.route_hashes(hashes, prompt_tokens, **kw)
        flight: dict[int, int] = defaultdict(int)
        for w, h in self.in_flight.values():
            flight[w] = max(flight[w], _lcp(h, hashes))
        best_indexed = max(indexed.values(), default=0)
        best_flight = max(flight.values(), default=0)
        chosen = max(indexed.get(d.worker, 0), flight.get(d.worker, 0))
        c = self.counts
        c["requests"] += 1
        c["blocks"] += len(hashes)
        if best_flight > best_indexed and flight.get(d.worker, 0) < best_flight:
            c["lag_requests"] += 1
            c["lag_blocks"] += best_flight - chosen
        if indexed.get(d.worker, 0) < best_indexed:
            c["load_requests"] += 1
            c["load_blocks"] += best_indexed - indexed.get(d.worker, 0)
        rid = kw.get("request_id")
        if rid:
            self.in_flight[rid] = (d.worker, list(hashes))
        return d

    def mark_prefill_done(self, request_id: str, now: float | None = None) -> bool:
        self.in_flight.pop(request_id, None)
        return self._inner.mark_prefill_done(request_id, now=now)

    def release(self, request_id: str) -> bool:
        self.in_flight.pop(request_id, None)
        return self._inner.release(request_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", choices=("conversation", "synthetic"), default="conversation")
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--speedups", default="1,2,4,8")
    ap.add_argument("--capacity-tokens", type=int, default=1_048_576)
    ap.add_argument("--pending-ttl", type=float, default=None,
                    help="pending_ttl_s (default: the product's; 0: in-flight prefixes off)")
    ap.add_argument("--profile", type=Path, default=DEFAULT_CALIBRATION)
    args = ap.parse_args(argv)
    path = MOONCAKE_CONVERSATION if args.trace == "conversation" else MOONCAKE_SYNTHETIC
    bs = 64
    trace = load_mooncake(path, limit=args.limit, name=args.trace)
    hashes = trace_hashes(trace, bs)
    oracle = pooled_lru(hashes, args.workers * (args.capacity_tokens // bs)).hit_rate
    profile = EngineProfile.load(args.profile)
    weights = SchedulerWeights()
    if args.pending_ttl is not None:
        weights.pending_ttl_s = args.pending_ttl
    rows = []
    for sp in (float(x) for x in args.speedups.split(",") if x):
        cfg = FleetConfig(num_workers=args.workers, weights=weights, seed=0,
                          engine=EngineConfig(block_size=bs,
                                              kv_capacity_tokens=args.capacity_tokens))
        sim = FleetSimulator(profile, cfg)
        probe = LagProbe(sim.scheduler, sim.index)
        sim.scheduler = probe  # type: ignore[assignment]
        rep = sim.run(prepare(trace, bs, sp, hashes)).report
        c = probe.counts
        rows.append([f"{sp:g}x", rep.hit_rate / oracle, rep.ttft_ms["mean"],
                     c["lag_requests"] / c["requests"], c["lag_blocks"] / c["blocks"],
                     c["load_requests"] / c["requests"], c["load_blocks"] / c["blocks"]])
    print(table(rows, ["speed", "hit/oracle", "mean_ttft_ms", "lag_requests", "lag_blocks",
                       "load_requests", "load_blocks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
