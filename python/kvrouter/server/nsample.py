"""Router-side n samples (inference-time scaling): placement, fan-out, aggregation.

Router.Generate with ``sampling.n > 1`` runs here (hooked from server/generate.py);
the contract is docs/inference-scaling.md. In short:

* Placement is the cost function's: sample 0 is routed like any request (prefix,
  load); every further sample is scored by a dry-run ``Scheduler.route`` over the
  same candidates, where a worker that already runs a sample of the request is
  charged no prefill (its samples share the prompt's KV: one prefill, n decodes);
  so the samples stay on the prefix holder until its decode load makes another
  holder cheaper, then they spread. Load is reserved for every sample (sample 0:
  prompt and decode blocks; a co-located sample: its decode blocks; the first
  sample on another worker: that worker's own prefill and blocks).
* Fan-out: one Engine.Generate per worker with ``n`` = its samples (engines
  fork the sequence after one prefill), read concurrently; a backend without n gets
  one call per sample, all at once (the engine shares the prompt among calls it
  schedules together), or with ``nsample.stagger_calls`` the worker's later ones once
  its first produced output.
* Aggregation: ``all`` streams every sample; ``vote`` returns the first sample
  with the majority answer (regex over the sample's text, or its token ids written
  as decimals when the model has no tokenizer) and,
  once the majority cannot change, cancels the outstanding samples at the
  engines (their calls are closed) and releases their load; ``best_logprob``
  the sample with the highest mean token logprob; ``scorer`` asks a Scorer
  service (scorer.proto) and falls back to a vote when it is down, slow (past
  ``nsample.scorer_timeout_s``) or answers nonsense.
* What happened is reported in the trace (trailing metadata ``kvrouter-samples``,
  ``kvrouter-placement``, ``kvrouter-early-stop``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
from tokenizers import Tokenizer

from kvrouter._core import NoRoutableWorker
from kvrouter._proto.v1 import common_pb2, engine_pb2, scorer_pb2, scorer_pb2_grpc
from kvrouter.backends.base import EngineCall, EngineChunk, EngineFailure, FailureKind
from kvrouter.backends.dispatch import Backends
from kvrouter.config import ModelConfig, NSampleConfig
from kvrouter.planner import NoWorker, Planner, Pool, Prompt
from kvrouter.registry import ModelState, WorkerInfo

log = logging.getLogger("kvrouter.server.nsample")

AGGREGATORS = ("all", "vote", "best_logprob", "scorer")


class SampleError(Exception):
    """Ends the request with this gRPC status (generate.py turns it into a GenerateError)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(msg: str) -> SampleError:
    return SampleError(grpc.StatusCode.INVALID_ARGUMENT, msg)


# --------------------------------------------------------------------------- request options


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """What a request asks of its n samples, validated before anything is reserved."""

    n: int
    aggregator: str
    answer_re: re.Pattern[str]
    scorer: str = ""  # name
    scorer_address: str = ""
    early_stop: bool = True

    @classmethod
    def parse(cls, n: int, aggregator: str, answer_regex: str, scorer: str,
              cfg: NSampleConfig) -> SampleSpec:
        if not 1 <= n <= cfg.max_n:
            raise _invalid(f"sampling.n must be 0..{cfg.max_n} on this model (nsample.max_n), "
                           f"got {n}")
        agg = aggregator or "all"
        if agg not in AGGREGATORS:
            raise _invalid(f"unknown aggregator {aggregator!r}; one of {', '.join(AGGREGATORS)}")
        if len(answer_regex) > 1024:
            raise _invalid("answer_regex is longer than 1024 characters")
        try:
            answer_re = re.compile(answer_regex or cfg.answer_regex)
        except re.error as e:
            raise _invalid(f"answer_regex does not compile: {e}") from None
        name = scorer or cfg.scorer
        address = ""
        if agg == "scorer":
            if not name:
                raise _invalid("aggregator 'scorer' needs a scorer: none named and the model "
                               "has no default (nsample.scorer)")
            address = cfg.scorers.get(name, "")
            if not address:
                raise _invalid(f"unknown scorer {name!r}; configured: {sorted(cfg.scorers)}")
        elif scorer:
            raise _invalid(f"scorer is only used with aggregator 'scorer', not {agg!r}")
        return cls(n, agg, answer_re, name, address, cfg.early_stop)


# --------------------------------------------------------------------------- placement


@dataclass(slots=True)
class Placement:
    """Samples per worker (global indices) and the reservations made for them."""

    groups: dict[int, list[int]] = field(default_factory=dict)  # worker id -> sample indices
    reservations: dict[int, str] = field(default_factory=dict)  # sample index -> reservation id
    lead: dict[int, str] = field(default_factory=dict)  # worker id -> reservation with prefill

    @property
    def colocated(self) -> bool:
        return len(self.groups) == 1


def sample_reservation(rid: str, index: int) -> str:
    return rid if index == 0 else f"{rid}#s{index}"


def place_samples(planner: Planner, prompt: Prompt, rid: str, n: int, output_tokens: int,
                  candidates: Sequence[int], cfg: ModelConfig,
                  now: float | None = None) -> Placement:
    """Place n samples on `candidates` and reserve their load (see the module doc).
    NoWorker when no candidate can take the request."""
    sched = planner.scheduler
    bs = planner.block_size
    out_blocks = -(-output_tokens // bs)
    pl = Placement()
    try:
        d0 = planner.route_whole(prompt, rid, output_tokens, candidates, now)
        pl.groups[d0.worker] = [0]
        pl.reservations[0] = rid
        pl.lead[d0.worker] = rid
        w = cfg.weights
        kv_policy = sched.policy == "kv"
        for i in range(1, n):
            best = d0.worker
            if kv_policy and len(candidates) > 1:
                best = _cheapest(planner, prompt, output_tokens, candidates, pl, w.prefill,
                                 w.queued_prefill, now)
            res = sample_reservation(rid, i)
            if best in pl.groups:  # shares the prompt's KV there: only its own output blocks
                sched.reserve(best, res, 0, out_blocks, now=now)
            else:
                planner.route_whole(prompt, res, output_tokens, [best], now)
                pl.lead[best] = res
            pl.groups.setdefault(best, []).append(i)
            pl.reservations[i] = res
    except BaseException:
        for res in pl.reservations.values():
            sched.release(res)
        raise
    return pl


def _cheapest(planner: Planner, prompt: Prompt, output_tokens: int, candidates: Sequence[int],
              pl: Placement, prefill_w: float, queued_prefill_w: float,
              now: float | None) -> int:
    """The worker where one more sample costs least, by the scheduler's own scores; on a
    worker already running the request the prompt is shared, so its prefill term (and the
    request's own queued prefill there) is taken out of the score."""
    sched = planner.scheduler
    bs = planner.block_size
    try:
        if prompt.hashes is not None:
            d = sched.route_hashes(prompt.hashes, prompt.prompt_tokens,
                                   expected_output_tokens=output_tokens, candidates=candidates,
                                   explain=True, reserve=False, now=now)
        else:
            d = sched.route(prompt.tokens, extra_key=prompt.extra_key,
                            expected_output_tokens=output_tokens, candidates=candidates,
                            explain=True, reserve=False, now=now)
    except NoRoutableWorker:
        return next(iter(pl.groups))
    best, best_cost = next(iter(pl.groups)), math.inf
    for c in d.candidates:
        cost = c.cost
        if c.worker in pl.groups:
            queued = sched.load(c.worker, now).prefill_tokens
            own = max(0, c.new_prefill_tokens - queued)  # this prompt's uncached tokens there
            cost -= prefill_w * own / bs
            if sched.has_reservation(pl.lead[c.worker]):
                # the request's own prefill still queued there does not delay this sample
                cost -= queued_prefill_w * min(queued, prompt.prompt_tokens) / bs
        if cost < best_cost - 1e-12 or (abs(cost - best_cost) <= 1e-12 and c.worker in pl.groups):
            best, best_cost = c.worker, cost
    return best


# --------------------------------------------------------------------------- aggregation


@dataclass(slots=True)
class Sample:
    index: int
    worker: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    cached_tokens: int = 0
    state: str = "running"  # running | done | cancelled | failed
    order: int = -1  # finishing order
    answer: str | None = None  # vote: set once the sample finished (answered = True)
    answered: bool = False

    def text(self, decode: Decoder | None = None) -> str:
        """The sample's text when the model has a tokenizer, else its token ids as
        space-separated decimals (what answer_regex runs on)."""
        if decode is not None:
            return decode(self.tokens)
        return " ".join(map(str, self.tokens))

    def mean_logprob(self) -> float | None:
        if not self.tokens or len(self.logprobs) != len(self.tokens):
            return None
        return sum(self.logprobs) / len(self.logprobs)


Decoder = Callable[[list[int]], str]


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Tokenizer | None:
    p = Path(path)
    try:
        return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    except Exception as e:  # tokenizers raises plain Exception for unreadable files
        log.warning("no tokenizer for votes, token ids are voted on",
                    extra={"path": path, "error": str(e)})
        return None


def decoder(cfg: ModelConfig) -> Decoder | None:
    """Token ids -> text with the model's tokenizer (models[].tokenizer), or None."""
    tok = _tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tok is None:
        return None
    return lambda ids: str(tok.decode(ids, skip_special_tokens=True))


def answer_of(sample: Sample, answer_re: re.Pattern[str],
              decode: Decoder | None = None) -> str | None:
    """The last match of the regex (its group 1 when it has groups), or None; the answer
    noted when the sample finished, if it was."""
    if sample.answered:
        return sample.answer
    last = None
    for m in answer_re.finditer(sample.text(decode)):
        last = m
    if last is None:
        return None
    return last.group(1) if answer_re.groups else last.group(0)


@dataclass(slots=True)
class VoteResult:
    answer: str | None
    votes: int
    chosen: Sample | None


def vote(samples: Sequence[Sample], answer_re: re.Pattern[str]) -> VoteResult:
    """Majority answer over finished samples; ties go to the answer reached first; the
    chosen sample is the first to finish with it. No answer anywhere: the first finished."""
    done = sorted((s for s in samples if s.state == "done"), key=lambda s: s.order)
    counts: Counter[str] = Counter()
    first: dict[str, Sample] = {}
    for s in done:
        a = answer_of(s, answer_re)
        if a is not None:
            counts[a] += 1
            first.setdefault(a, s)
    if not counts:
        return VoteResult(None, 0, done[0] if done else None)
    top = max(counts.values())
    answer = next(a for a in first if counts[a] == top)  # first-reached among the tied
    return VoteResult(answer, top, first[answer])


def vote_decided(samples: Sequence[Sample], answer_re: re.Pattern[str]) -> bool:
    """True once no outcome of the outstanding samples can change the vote's winner."""
    outstanding = sum(1 for s in samples if s.state == "running")
    if outstanding == 0:
        return True
    counts = Counter(a for s in samples if s.state == "done"
                     if (a := answer_of(s, answer_re)) is not None)
    if not counts:
        return False
    ranked = counts.most_common(2)
    second = ranked[1][1] if len(ranked) > 1 else 0
    return ranked[0][1] > second + outstanding


def best_by_logprob(samples: Sequence[Sample]) -> Sample | None:
    best, best_lp = None, -math.inf
    for s in samples:
        lp = s.mean_logprob() if s.state == "done" else None
        if lp is not None and lp > best_lp:
            best, best_lp = s, lp
    return best


class ScorerFailure(Exception):
    pass


async def score_samples(address: str, timeout_s: float, model: str, rid: str,
                        prompt: np.ndarray, samples: Sequence[Sample]) -> list[float]:
    """Scorer.Score over `samples`; ScorerFailure (with the reason) when it is down, slow
    or answers something else than one finite score per candidate."""
    req = scorer_pb2.ScoreRequest(model=model, request_id=rid,
                                  prompt_token_ids=prompt.tolist(),
                                  candidates=[scorer_pb2.ScoreCandidate(
                                      sample_index=s.index, token_ids=s.tokens,
                                      finish_reason=s.finish_reason) for s in samples])
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            resp = await scorer_pb2_grpc.ScorerStub(ch).Score(req, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise ScorerFailure(f"scorer {address} answered {e.code().name}") from None
    scores = list(resp.scores)
    if len(scores) != len(samples) or not all(math.isfinite(x) for x in scores):
        raise ScorerFailure(f"scorer {address} returned {len(scores)} scores for "
                            f"{len(samples)} candidates (or a non-finite one)")
    return scores


# --------------------------------------------------------------------------- the run


class TraceLike(Protocol):
    path: str
    pool: str
    request_class: str
    reason: str
    worker: str
    samples: list[tuple[str, str]]


class RequestLike(Protocol):
    """The parts of generate.py's _Request this module reads."""

    rid: str
    model: ModelState
    cfg: ModelConfig
    prompt: np.ndarray
    max_tokens: int
    expected_output: int
    sampling: common_pb2.SamplingParams
    extra_key: bytes
    lora_name: str
    session_id: str


@dataclass(slots=True)
class Report:
    """What happened to the n samples, as trailing metadata."""

    spec: SampleSpec
    placement: dict[str, int] = field(default_factory=dict)  # worker name -> samples
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    early_stop: str = ""
    chosen: int = -1
    answer: str | None = None
    votes: int = 0
    scores: str = ""
    fallback: str = ""

    def metadata(self) -> list[tuple[str, str]]:
        s = self.spec
        # values are read by people and parsed by tests: comma-separated, no spaces (spaces
        # travel percent-encoded, generate.GenerateTrace.metadata)
        md = [("kvrouter-samples", f"n={s.n},finished={self.finished},"
                                   f"cancelled={self.cancelled},failed={self.failed}"),
              ("kvrouter-placement", ",".join(f"{w}:{k}" for w, k in self.placement.items())),
              ("kvrouter-aggregator", s.aggregator)]
        if self.early_stop:
            md.append(("kvrouter-early-stop", self.early_stop))
        if self.chosen >= 0:
            md.append(("kvrouter-chosen-sample", str(self.chosen)))
        if self.answer is not None:
            md.append(("kvrouter-answer", self.answer[:256]))
            md.append(("kvrouter-votes", f"{self.votes}/{self.finished}"))
        if self.scores:
            md.append(("kvrouter-scores", self.scores))
        if self.fallback:
            md.append(("kvrouter-fallback", self.fallback[:512]))
        return md


SuspectFn = Callable[[WorkerInfo, float], None]


async def run_samples(r: RequestLike, spec: SampleSpec, planner: Planner,
                      pools: dict[str, Pool], backends: Backends, trace: TraceLike,
                      suspect: SuspectFn) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
    """Place, fan out and aggregate the n samples of one request (see the module doc)."""
    sched = planner.scheduler
    prompt = Prompt.from_tokens(r.prompt, r.extra_key or None)
    try:
        pool_name, cls = planner.choose_pool(len(r.prompt), r.expected_output, pools,
                                             "aggregated")
    except NoWorker as e:
        raise SampleError(grpc.StatusCode.UNAVAILABLE, f"no routable worker can serve model "
                                                       f"{r.model.name!r}: {e}") from None
    pool = pools[pool_name]
    cands = pool.aggregated or pool.decode
    try:
        pl = place_samples(planner, prompt, r.rid, spec.n, r.expected_output, cands, r.cfg)
    except NoWorker as e:
        raise SampleError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
    infos = {i.wid: i for i in list(r.model.workers.values())}
    report = Report(spec)
    trace.path, trace.pool, trace.request_class = "aggregated", pool_name, cls
    trace.reason = "n samples: " + ("colocated" if pl.colocated else "spread")
    samples = [Sample(i) for i in range(spec.n)]
    queue: asyncio.Queue[tuple[int, list[int], EngineChunk | EngineFailure | None]] = \
        asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []
    deferred: dict[int, list[list[int]]] = {}  # worker id -> calls started after its lead
    finished_order = 0
    decode = decoder(r.cfg) if spec.aggregator != "all" else None

    def release(idx: int) -> None:
        res = pl.reservations.pop(idx, None)
        if res is not None:
            sched.release(res)

    async def pump(wid: int, idxs: list[int]) -> None:
        info = infos[wid]
        try:
            sp = common_pb2.SamplingParams()
            sp.CopyFrom(r.sampling)
            sp.n = len(idxs)
            if sp.HasField("seed"):  # each call its own stream: samples must not repeat
                sp.seed = (sp.seed + idxs[0]) % (1 << 64)
            call = EngineCall(request_id=f"{r.rid}.s{idxs[0]}", token_ids=r.prompt,
                              max_tokens=r.max_tokens, sampling=sp, extra_key=r.extra_key,
                              lora_name=r.lora_name, session_id=r.session_id)
            async for c in backends.for_worker(info).generate(info, r.model.name, call):
                await queue.put((wid, idxs, c))
            await queue.put((wid, idxs, None))
        except EngineFailure as f:
            await queue.put((wid, idxs, f))

    try:
        for wid, idxs in pl.groups.items():
            info = infos.get(wid)
            if info is None:
                raise SampleError(grpc.StatusCode.UNAVAILABLE,
                                  f"worker #{wid} left the registry while placing samples")
            report.placement[info.name] = len(idxs)
            for i in idxs:
                samples[i].worker = info.name
            # an engine that takes n runs the worker's samples as one call (one prefill, n
            # decodes); a backend without n (the OpenAI client here) gets one call per
            # sample: all at once (vLLM v1 caches a prompt's blocks as it schedules them, so
            # calls arriving together compute it once; SGLang's cache-aware policies hold
            # back same-prefix requests of a batch), or, staggered, the others once the first has produced
            # output (its prompt KV is in the engine's prefix cache then)
            if _supports_n(backends, info):
                tasks.append(asyncio.create_task(pump(wid, idxs)))
            elif not r.cfg.nsample.stagger_calls:
                tasks.extend(asyncio.create_task(pump(wid, [i])) for i in idxs)
            else:
                tasks.append(asyncio.create_task(pump(wid, idxs[:1])))
                if len(idxs) > 1:
                    deferred[wid] = [[i] for i in idxs[1:]]
        trace.worker = ",".join(report.placement)
        started: set[int] = set()
        open_streams = len(tasks)
        last_failure: EngineFailure | None = None

        def start_deferred(wid: int) -> int:
            later = deferred.pop(wid, [])
            tasks.extend(asyncio.create_task(pump(wid, one)) for one in later)
            return len(later)

        while open_streams:
            wid, idxs, item = await queue.get()
            if item is None or isinstance(item, EngineFailure):
                open_streams -= 1
                open_streams += start_deferred(wid)  # the lead call ended without output
                for i in idxs:
                    if samples[i].state == "running":
                        samples[i].state = "failed"
                        report.failed += 1
                        release(i)
                if isinstance(item, EngineFailure):
                    last_failure = item
                    info = infos.get(wid)
                    if info is not None and item.kind is FailureKind.WORKER:
                        suspect(info, r.cfg.disagg.suspect_s)
                    log.debug("sample call failed", extra={"request": r.rid,
                                                           "error": item.message})
                continue
            c = item
            if wid not in started and (c.token_ids or c.finished):
                started.add(wid)
                sched.mark_prefill_done(pl.lead[wid])
                open_streams += start_deferred(wid)
            if not 0 <= c.sample_index < len(idxs):
                continue  # an engine answering for samples it was not asked for
            s = samples[idxs[c.sample_index]]
            if s.state != "running":
                continue
            s.tokens.extend(c.token_ids)
            s.logprobs.extend(c.logprobs)
            if spec.aggregator == "all":
                yield _out(r, s, c)
            if not c.finished:
                continue
            s.state, s.finish_reason, s.cached_tokens = "done", c.finish_reason or "length", \
                c.cached_tokens
            s.order = finished_order
            finished_order += 1
            report.finished += 1
            release(s.index)
            s.answer, s.answered = answer_of(s, spec.answer_re, decode), True
            if (spec.aggregator == "vote" and spec.early_stop
                    and vote_decided(samples, spec.answer_re)):
                running = [x for x in samples if x.state == "running"]
                if running:
                    report.early_stop = f"after={report.finished}/{spec.n}"
                    for x in running:
                        x.state = "cancelled"
                        release(x.index)
                    report.cancelled = len(running)
                    break
        if report.finished == 0:
            f = last_failure
            if f is not None and f.kind in (FailureKind.INVALID, FailureKind.REJECTED):
                raise SampleError(f.code, f"refused by worker {f.worker!r}: {f.message}")
            raise SampleError(grpc.StatusCode.UNAVAILABLE,
                              f"no sample of {spec.n} finished"
                              + (f"; last: {last_failure}" if last_failure else ""))
        if spec.aggregator != "all":
            chosen = await _choose(r, spec, samples, report)
            yield _final(r, chosen, samples)
    finally:
        for t in tasks:  # closes the engine streams: the engines abort those samples
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for i in list(pl.reservations):
            release(i)
        trace.samples = report.metadata()


def _supports_n(backends: Backends, info: WorkerInfo) -> bool:
    try:
        return bool(getattr(backends.for_worker(info), "supports_n", False))
    except EngineFailure:
        return False  # its call fails with the reason (unknown backend) and is reported


async def _choose(r: RequestLike, spec: SampleSpec, samples: list[Sample],
                  report: Report) -> Sample:
    done = [s for s in samples if s.state == "done"]
    chosen: Sample | None = None
    if spec.aggregator == "best_logprob":
        chosen = best_by_logprob(done)
        if chosen is None:
            report.fallback = "no logprobs from the engine: vote"
    elif spec.aggregator == "scorer":
        try:
            scores = await score_samples(spec.scorer_address, r.cfg.nsample.scorer_timeout_s,
                                         r.model.name, r.rid, r.prompt, done)
        except ScorerFailure as e:
            report.fallback = f"{e}: vote"
        else:
            report.scores = ",".join(f"{s.index}={x:.6g}" for s, x in zip(done, scores,
                                                                         strict=True))
            chosen = done[max(range(len(done)), key=lambda k: (scores[k], -done[k].order))]
    if chosen is None:
        v = vote(samples, spec.answer_re)
        report.answer, report.votes = v.answer, v.votes
        chosen = v.chosen
    assert chosen is not None  # some sample finished
    report.chosen = chosen.index
    return chosen


def _out(r: RequestLike, s: Sample, c: EngineChunk) -> engine_pb2.GenerateResponse:
    resp = engine_pb2.GenerateResponse(request_id=r.rid, token_ids=c.token_ids,
                                       sample_index=s.index, worker=s.worker,
                                       logprobs=c.logprobs)
    if c.finished:
        resp.finished = True
        resp.finish_reason = c.finish_reason or "length"
        resp.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(r.prompt),
                                             cached_tokens=c.cached_tokens,
                                             completion_tokens=len(s.tokens)))
    return resp


def _final(r: RequestLike, chosen: Sample, samples: Sequence[Sample],
           ) -> engine_pb2.GenerateResponse:
    """The aggregated reply: the chosen sample whole; usage counts every sample's tokens
    (what the request cost), as OpenAI's usage does for n choices."""
    return engine_pb2.GenerateResponse(
        request_id=r.rid, token_ids=chosen.tokens, sample_index=chosen.index,
        worker=chosen.worker, logprobs=chosen.logprobs, finished=True,
        finish_reason=chosen.finish_reason,
        usage=common_pb2.Usage(prompt_tokens=len(r.prompt), cached_tokens=chosen.cached_tokens,
                               completion_tokens=sum(len(s.tokens) for s in samples)))


def check_request(req: Any, cfg: ModelConfig) -> SampleSpec:
    """The request's n-sample options, or SampleError (INVALID_ARGUMENT)."""
    return SampleSpec.parse(req.sampling.n, req.aggregator, req.answer_regex, req.scorer,
                            cfg.nsample)
