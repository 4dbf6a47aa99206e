"""Fleet metrics: latency percentiles, throughput, prefix hit rate, load imbalance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    worker: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    prompt_blocks: int
    hit_blocks: int  # reused by the engine when admitted
    routed_overlap_blocks: int  # what the router believed the worker held
    preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class WorkerRecord:
    worker: int
    requests: int
    busy_s: float
    prefill_tokens: int
    reused_tokens: int
    decode_tokens: int
    preemptions: int
    itl: list[tuple[float, int]] = field(default_factory=list, repr=False)


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 90, 99)
                ) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {f"p{q:g}": float("nan") for q in qs} | {"mean": float("nan")}
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["mean"] = float(arr.mean())
    return out


def weighted_percentiles(samples: Sequence[tuple[float, int]],
                         qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Percentiles of values given as (value, count) pairs."""
    if not samples:
        return {f"p{q:g}": float("nan") for q in qs} | {"mean": float("nan")}
    v = np.array([s[0] for s in samples], dtype=float)
    w = np.array([s[1] for s in samples], dtype=float)
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cum = np.cumsum(w)
    total = cum[-1]
    out = {}
    for q in qs:
        i = int(np.searchsorted(cum, q / 100.0 * total, side="left"))
        out[f"p{q:g}"] = float(v[min(i, v.size - 1)])
    out["mean"] = float((v * w).sum() / total)
    return out


def imbalance(per_worker: Sequence[float]) -> float:
    """max / mean of per-worker work (1.0: perfectly even)."""
    arr = np.asarray(per_worker, dtype=float)
    mean = arr.mean() if arr.size else 0.0
    return float(arr.max() / mean) if mean > 0 else 1.0


@dataclass
class FleetReport:
    num_workers: int
    policy: str
    requests: int
    completed: int
    rejected: int
    makespan_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    throughput_rps: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    output_tokens_per_s_per_user: float
    hit_rate: float  # prompt blocks reused by engines / prompt blocks
    routed_hit_rate: float  # prompt blocks the router expected to reuse / prompt blocks
    imbalance: float  # max/mean of per-worker busy time
    imbalance_requests: float
    imbalance_prefill_tokens: float
    preemptions: int
    per_worker: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """The headline numbers, flat."""
        return {"mean_ttft_ms": self.ttft_ms["mean"], "p50_ttft_ms": self.ttft_ms["p50"],
                "p90_ttft_ms": self.ttft_ms["p90"], "p99_ttft_ms": self.ttft_ms["p99"],
                "mean_itl_ms": self.itl_ms["mean"], "p99_itl_ms": self.itl_ms["p99"],
                "p50_e2e_ms": self.e2e_ms["p50"], "p99_e2e_ms": self.e2e_ms["p99"],
                "throughput_rps": self.throughput_rps,
                "output_tokens_per_s_per_gpu": self.output_tokens_per_s_per_gpu,
                "output_tokens_per_s_per_user": self.output_tokens_per_s_per_user,
                "hit_rate": self.hit_rate, "routed_hit_rate": self.routed_hit_rate,
                "imbalance": self.imbalance, "preemptions": float(self.preemptions)}


def build_report(policy: str, records: Sequence[RequestRecord], workers: Sequence[WorkerRecord],
                 rejected: int = 0) -> FleetReport:
    n = len(workers)
    if records:
        start = min(r.arrival_s for r in records)
        makespan = max(r.finish_s for r in records) - start
    else:
        makespan = 0.0
    ttft = np.array([r.ttft_s * 1000.0 for r in records])
    e2e = np.array([r.e2e_s * 1000.0 for r in records])
    itl_samples = [(d * 1000.0, c) for w in workers for d, c in w.itl]
    out_tokens = sum(r.output_tokens for r in records)
    in_tokens = sum(r.prompt_tokens for r in records)
    per_user = [(r.output_tokens - 1) / (r.finish_s - r.first_token_s)
                for r in records if r.output_tokens > 1 and r.finish_s > r.first_token_s]
    prompt_blocks = sum(r.prompt_blocks for r in records)
    span = makespan if makespan > 0 else float("nan")
    return FleetReport(
        num_workers=n, policy=policy, requests=len(records) + rejected, completed=len(records),
        rejected=rejected, makespan_s=makespan,
        ttft_ms=percentiles(ttft), itl_ms=weighted_percentiles(itl_samples),
        e2e_ms=percentiles(e2e),
        throughput_rps=len(records) / span, output_tokens_per_s=out_tokens / span,
        total_tokens_per_s=(in_tokens + out_tokens) / span,
        output_tokens_per_s_per_gpu=out_tokens / span / max(n, 1),
        output_tokens_per_s_per_user=float(np.mean(per_user)) if per_user else float("nan"),
        hit_rate=sum(r.hit_blocks for r in records) / prompt_blocks if prompt_blocks else 0.0,
        routed_hit_rate=(sum(min(r.routed_overlap_blocks, r.prompt_blocks) for r in records)
                         / prompt_blocks if prompt_blocks else 0.0),
        imbalance=imbalance([w.busy_s for w in workers]),
        imbalance_requests=imbalance([w.requests for w in workers]),
        imbalance_prefill_tokens=imbalance([w.prefill_tokens for w in workers]),
        preemptions=sum(w.preemptions for w in workers),
        per_worker=[{"worker": w.worker, "requests": w.requests, "busy_s": w.busy_s,
                     "prefill_tokens": w.prefill_tokens, "reused_tokens": w.reused_tokens,
                     "decode_tokens": w.decode_tokens, "preemptions": w.preemptions}
                    for w in workers],
    )
