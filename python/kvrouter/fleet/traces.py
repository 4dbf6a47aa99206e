"""Workloads for the fleet simulator: Mooncake and Azure traces, synthetic generators.

Every request is described by arrival time, input and output length, and
*content ids*: one id per ``id_block`` prompt tokens, where equal leading ids
mean equal prompt prefixes (Mooncake's ``hash_ids``, 512 tokens each). To route
them like real prompts, each request gets synthetic token ids that are a pure
function of (content id, position inside that id's block); the router hashes
those tokens with its one block hasher (``kvrouter._core.hash_blocks``). Equal
content-id prefixes therefore give equal router hash chains at any router block
size, and the trailing partial block is not hashed.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from kvrouter.shared_data import shared_dir

TRACE_DIR = shared_dir() / "traces"
MOONCAKE_CONVERSATION = TRACE_DIR / "mooncake" / "conversation_trace.jsonl"
MOONCAKE_SYNTHETIC = TRACE_DIR / "mooncake" / "synthetic_trace.jsonl"
AZURE_CONV = TRACE_DIR / "azure" / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = TRACE_DIR / "azure" / "AzureLLMInferenceTrace_code.csv"

MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    """A trace file is missing or malformed (the message names file and line)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    content_ids: tuple[int, ...]
    session: int = -1


@dataclass
class Trace:
    name: str
    id_block: int
    requests: list[TraceRequest]
    source: str = ""
    meta: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def head(self, n: int) -> Trace:
        """The first n requests (in arrival order)."""
        return replace(self, name=f"{self.name}[:{n}]", requests=self.requests[:n])

    def speedup(self, ratio: float) -> Trace:
        """Arrivals compressed by `ratio` (2.0: twice the request rate)."""
        if ratio <= 0:
            raise ValueError("speedup ratio must be > 0")
        return replace(self, requests=[replace(r, arrival_s=r.arrival_s / ratio)
                                       for r in self.requests])


def _check(req: TraceRequest, id_block: int, where: str) -> None:
    if req.input_length <= 0 or req.output_length <= 0:
        raise TraceError(f"{where}: input_length and output_length must be > 0")
    if req.content_ids and len(req.content_ids) * id_block < req.input_length:
        raise TraceError(f"{where}: {len(req.content_ids)} content ids cover fewer than "
                         f"{req.input_length} tokens")
    if not math.isfinite(req.arrival_s) or req.arrival_s < 0:
        raise TraceError(f"{where}: bad timestamp")


def load_mooncake(path: str | Path = MOONCAKE_CONVERSATION, limit: int | None = None,
                  name: str | None = None) -> Trace:
    """Mooncake FAST'25 jsonl: timestamp (ms), input_length, output_length, hash_ids."""
    p = Path(path)
    reqs: list[TraceRequest] = []
    try:
        fh = p.open()
    except OSError as exc:
        raise TraceError(f"cannot open trace {p}: {exc}") from exc
    with fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(reqs) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
                req = TraceRequest(arrival_s=float(row["timestamp"]) / 1000.0,
                                   input_length=int(row["input_length"]),
                                   output_length=int(row["output_length"]),
                                   content_ids=tuple(int(h) for h in row["hash_ids"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise TraceError(f"{where}: {exc!r}") from exc
            _check(req, MOONCAKE_BLOCK, where)
            reqs.append(req)
    reqs.sort(key=lambda r: r.arrival_s)  # stable: file order among equal timestamps
    return Trace(name=name or p.stem, id_block=MOONCAKE_BLOCK, requests=reqs, source=str(p))


def load_azure(path: str | Path = AZURE_CONV, limit: int | None = None,
               name: str | None = None) -> Trace:
    """Azure LLM inference trace 2023 csv: TIMESTAMP, ContextTokens, GeneratedTokens.

    Prompts are unique (the trace has no content), so every request gets its own ids."""
    p = Path(path)
    reqs: list[TraceRequest] = []
    next_id = 0
    t0: datetime | None = None
    try:
        fh = p.open(newline="")
    except OSError as exc:
        raise TraceError(f"cannot open trace {p}: {exc}") from exc
    with fh:
        for lineno, row in enumerate(csv.DictReader(fh), 2):
            if limit is not None and len(reqs) >= limit:
                break
            where = f"{p}:{lineno}"
            try:
                ts = datetime.fromisoformat(row["TIMESTAMP"].strip())
                n_in = int(row["ContextTokens"])
                n_out = int(row["GeneratedTokens"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise TraceError(f"{where}: {exc!r}") from exc
            if t0 is None:
                t0 = ts
            n_ids = -(-n_in // MOONCAKE_BLOCK)
            ids = tuple(range(next_id, next_id + n_ids))
            next_id += n_ids
            # A few rows have 0 generated tokens; an engine always produces one.
            req = TraceRequest(arrival_s=(ts - t0).total_seconds(), input_length=max(n_in, 1),
                               output_length=max(n_out, 1), content_ids=ids)
            _check(req, MOONCAKE_BLOCK, where)
            reqs.append(req)
    reqs.sort(key=lambda r: r.arrival_s)
    return Trace(name=name or p.stem, id_block=MOONCAKE_BLOCK, requests=reqs, source=str(p))


def synthetic_shared_prefix(num_requests: int = 2000, num_groups: int = 16,
                            prefix_tokens: int = 4096, suffix_tokens: int = 1024,
                            output_tokens: int = 256, rate_per_s: float = 8.0,
                            seed: int = 0, id_block: int = 64) -> Trace:
    """Requests drawn from `num_groups` shared prefixes (e.g. system prompts or
    documents) with unique suffixes; Poisson arrivals; group popularity Zipf(1)."""
    if min(num_requests, num_groups, prefix_tokens, suffix_tokens, output_tokens) <= 0:
        raise ValueError("synthetic_shared_prefix: sizes must be > 0")
    rng = np.random.default_rng(seed)
    n_pre = -(-prefix_tokens // id_block)
    weights = 1.0 / np.arange(1, num_groups + 1)
    groups = rng.choice(num_groups, size=num_requests, p=weights / weights.sum())
    gaps = rng.exponential(1.0 / rate_per_s, size=num_requests)
    t = 0.0
    next_id = num_groups * n_pre
    reqs: list[TraceRequest] = []
    for i in range(num_requests):
        t += float(gaps[i])
        g = int(groups[i])
        suffix = max(1, int(rng.integers(suffix_tokens // 2, suffix_tokens * 3 // 2 + 1)))
        n_in = n_pre * id_block + suffix
        n_ids = -(-n_in // id_block)
        ids = tuple(range(g * n_pre, (g + 1) * n_pre)) + tuple(
            range(next_id, next_id + n_ids - n_pre))
        next_id += n_ids - n_pre
        reqs.append(TraceRequest(arrival_s=t, input_length=n_in, output_length=output_tokens,
                                 content_ids=ids, session=g))
    return Trace(name="synthetic-shared-prefix", id_block=id_block, requests=reqs,
                 source="generated", meta={"num_groups": num_groups, "seed": seed})


def synthetic_sessions(num_sessions: int = 200, turns: int = 6, system_tokens: int = 2048,
                       user_tokens: int = 512, output_tokens: int = 256,
                       think_time_s: float = 20.0, session_rate_per_s: float = 1.0,
                       seed: int = 0, id_block: int = 64) -> Trace:
    """Multi-turn chat sessions: every turn's prompt is the previous prompt plus the
    previous answer and a new user message, under one system prompt shared by all.

    Arrivals are open loop: a session's next turn comes `think_time_s` (exponential)
    after the previous one arrived, whether or not it was answered."""
    if min(num_sessions, turns, system_tokens, user_tokens, output_tokens) <= 0:
        raise ValueError("synthetic_sessions: sizes must be > 0")
    rng = np.random.default_rng(seed)
    n_sys = -(-system_tokens // id_block)
    sys_ids = tuple(range(n_sys))
    next_id = n_sys
    reqs: list[TraceRequest] = []
    start = 0.0
    for s in range(num_sessions):
        start += float(rng.exponential(1.0 / session_rate_per_s))
        t = start
        ids: tuple[int, ...] = sys_ids
        for _turn in range(turns):
            n_user = -(-max(1, int(rng.integers(user_tokens // 2, user_tokens * 3 // 2 + 1)))
                       // id_block)
            ids = ids + tuple(range(next_id, next_id + n_user))
            next_id += n_user
            reqs.append(TraceRequest(arrival_s=t, input_length=len(ids) * id_block,
                                     output_length=output_tokens, content_ids=ids, session=s))
            n_ans = -(-output_tokens // id_block)
            ids = ids + tuple(range(next_id, next_id + n_ans))  # the answer joins the history
            next_id += n_ans
            t += float(rng.exponential(think_time_s))
    reqs.sort(key=lambda r: r.arrival_s)
    return Trace(name="synthetic-sessions", id_block=id_block, requests=reqs, source="generated",
                 meta={"num_sessions": num_sessions, "turns": turns, "seed": seed})


# -- router hashes ---------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def synthetic_tokens(content_ids: Sequence[int], id_block: int, n_tokens: int) -> np.ndarray:
    """Token ids (uint32) of the first n_tokens of a prompt: token p is a fixed mix of
    (content_ids[p // id_block], p % id_block), so equal ids give equal tokens."""
    n_ids = -(-n_tokens // id_block)
    if n_ids > len(content_ids):
        raise ValueError(f"{len(content_ids)} content ids cover fewer than {n_tokens} tokens")
    ids = np.asarray(content_ids[:n_ids], dtype=np.uint64)
    pos = np.arange(id_block, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (ids[:, None] * np.uint64(id_block) + pos[None, :]).ravel()[:n_tokens] + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    # below 2**31: valid ids for any tokenizer-agnostic consumer
    return (z & np.uint64(0x7FFFFFFF)).astype(np.uint32)


def router_hashes(req: TraceRequest, id_block: int, block_size: int) -> list[int]:
    """Router sequence hashes of the request's full blocks (the partial tail is not hashed)."""
    from kvrouter._core import hash_blocks

    n_full = req.input_length // block_size
    if n_full == 0:
        return []
    tokens = synthetic_tokens(req.content_ids, id_block, n_full * block_size)
    return hash_blocks(tokens, block_size)


def trace_hashes(trace: Trace, block_size: int) -> list[list[int]]:
    """Router hashes of every request of a trace, in trace order."""
    return [router_hashes(r, trace.id_block, block_size) for r in trace.requests]
