"""Load reports scraped from vLLM's and SGLang's Prometheus /metrics endpoints.

The bridges use these to correct the router's own load accounting (docs/design.md §2,
load path) for engines that do not report load any other way.

Metrics read (gauges; the first name found wins, older names after newer ones):

    engine  running                    queued                     KV usage (fraction 0..1)
    vLLM    vllm:num_requests_running  vllm:num_requests_waiting  vllm:kv_cache_usage_perc
                                                                  (older name:
                                                                  vllm:gpu_cache_usage_perc)
    SGLang  sglang:num_running_reqs    sglang:num_queue_reqs      sglang:token_usage

KV usage is a fraction; LoadReport wants blocks, so the total is needed: vLLM
publishes it as the num_gpu_blocks label of vllm:cache_config_info; SGLang's
sglang:max_total_num_tokens (when exported) divided by block_size. A caller
that knows the total passes total_blocks, which wins. Without a total the block
counts are reported as 0 (unknown), never guessed.

Series are filtered by `labels` (e.g. {"engine": "1"} for one vLLM data-parallel
engine); the remaining series are summed (request counts) or averaged (usage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client.parser import text_string_to_metric_families

from kvrouter.events.model import LoadReport


class BridgedEngine(StrEnum):
    """The engines the ZMQ bridge serves (kvrouter.engines.bridge)."""

    VLLM = "vllm"
    SGLANG = "sglang"


@dataclass(frozen=True, slots=True)
class _Names:
    running: tuple[str, ...]
    queued: tuple[str, ...]
    usage: tuple[str, ...]


_NAMES = {
    BridgedEngine.VLLM: _Names(
        running=("vllm:num_requests_running",),
        queued=("vllm:num_requests_waiting",),
        usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    BridgedEngine.SGLANG: _Names(
        running=("sglang:num_running_reqs",),
        queued=("sglang:num_queue_reqs",),
        usage=("sglang:token_usage",),
    ),
}


class ScrapeError(ValueError):
    """The text is not Prometheus exposition format, or lacks the engine's load metrics."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the scrape found, before conversion to blocks."""

    running: int
    queued: int
    kv_usage: float | None  # fraction 0..1
    total_blocks: int | None

    def to_load_report(self) -> LoadReport:
        used = free = 0
        if self.kv_usage is not None and self.total_blocks is not None:
            used = min(self.total_blocks, round(self.kv_usage * self.total_blocks))
            free = self.total_blocks - used
        # vLLM's usage counts blocks running requests hold; freed blocks keep their cached
        # prefix until reused, which the router's index knows (no metric for them).
        return LoadReport(running=self.running, queued=self.queued, kv_used_blocks=used,
                          kv_free_blocks=free, kv_capacity_blocks=self.total_blocks or 0)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    except ValueError as exc:
        raise ScrapeError(f"not Prometheus text format: {exc}") from exc
    return out


def _select(series: Iterable[tuple[dict[str, str], float]], labels: Mapping[str, str]
            ) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for lab, v in series if all(lab.get(k) == w for k, w in labels.items())]


def _first(samples: dict[str, list[tuple[dict[str, str], float]]], names: tuple[str, ...],
           labels: Mapping[str, str]) -> list[float] | None:
    for name in names:
        if name in samples:
            values = [v for _lab, v in _select(samples[name], labels)]
            if values:
                return values
    return None


def _count(values: list[float], what: str) -> int:
    total = sum(values)
    if total != total or total < 0 or total == float("inf"):  # NaN / negative / inf
        raise ScrapeError(f"{what} is {total}, expected a count")
    return round(total)


def parse_load(text: str, engine: BridgedEngine | str, labels: Mapping[str, str] | None = None,
               total_blocks: int | None = None, block_size: int | None = None) -> EngineLoad:
    """Parse one /metrics text into the engine's load (ScrapeError if it is missing)."""
    engine = BridgedEngine(engine)
    names = _NAMES[engine]
    labels = labels or {}
    samples = _samples(text)
    running = _first(samples, names.running, labels)
    queued = _first(samples, names.queued, labels)
    if running is None or queued is None:
        missing = names.running[0] if running is None else names.queued[0]
        raise ScrapeError(f"{engine.value} metrics lack {missing}"
                          + (f" for labels {dict(labels)}" if labels else ""))
    usage_values = _first(samples, names.usage, labels)
    usage = None
    if usage_values:
        usage = sum(usage_values) / len(usage_values)
        if not 0.0 <= usage <= 1.0:
            raise ScrapeError(f"KV cache usage {usage} is not a fraction in 0..1")
    if total_blocks is None:
        total_blocks = _total_blocks(samples, engine, labels, block_size)
    return EngineLoad(running=_count(running, names.running[0]),
                      queued=_count(queued, names.queued[0]),
                      kv_usage=usage, total_blocks=total_blocks)


def scrape_to_load_report(text: str, engine: BridgedEngine | str,
                          labels: Mapping[str, str] | None = None,
                          total_blocks: int | None = None,
                          block_size: int | None = None) -> LoadReport:
    return parse_load(text, engine, labels, total_blocks, block_size).to_load_report()


def _total_blocks(samples: dict[str, list[tuple[dict[str, str], float]]], engine: BridgedEngine,
                  labels: Mapping[str, str], block_size: int | None) -> int | None:
    # One series per engine (data-parallel rank) that passed the label filter: the
    # totals add up like the request counts do.
    if engine is BridgedEngine.VLLM:
        info = _select(samples.get("vllm:cache_config_info", []), labels)
        blocks = [lab.get("num_gpu_blocks", "") for lab, _v in info]
        if blocks and all(b.isdigit() for b in blocks):
            return sum(int(b) for b in blocks)
        return None
    tokens = _first(samples, ("sglang:max_total_num_tokens",), labels)
    if tokens and block_size:
        return int(sum(tokens)) // block_size
    return None
