"""The simulated engine core (SimEngine) driven in scaled wall time, as a worker.

Simulated time runs on the wall clock scaled by `time_scale` (1.0: real time,
0.1: ten times faster); a driver task advances the core to "now", sleeps until its
next observable change and streams the generated tokens to the Generate callers.

The core's KV events are re-expressed with the request's real token ids
(BlockStored carries token_ids and the engine block size), so the router re-hashes
them with its own hash exactly as it does for TensorRT-LLM or vLLM.

Disaggregated serving: a CONTEXT_ONLY request ends with DisaggregatedParams (first
token, a context request id unique to this process start, this worker's address and
an opaque state); its KV stays in this worker's prefix cache until a generation
worker pulls it (`transfer_kv`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvrouter._core import hash_blocks
from kvrouter._proto.v1 import common_pb2, engine_pb2
from kvrouter.counters import Counters
from kvrouter.engines.sim.engine import RequestMode, SimEngine, SimRequest
from kvrouter.engines.sim.host_tier import SessionKv
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, LoadReport, Tier
from kvrouter.events.publisher import EventPublisher

log = logging.getLogger("kvrouter.engines.sim")


@dataclass
class WorkerStats(Counters):
    """Generate calls seen by the worker (the core counts its own steps: EngineStats)."""

    requests: int = 0
    rejected: int = 0
    abandoned: int = 0
    events: int = 0
    preempted: int = 0


@dataclass(slots=True)
class _CachedBlock:
    """What the router needs to know about one cached engine block."""

    tokens: tuple[int, ...]
    parent: int | None
    depth: int
    extra_key: bytes | None


@dataclass(eq=False, slots=True)
class _Sample:
    req: SimRequest
    index: int
    rng: random.Random
    sent: int = 0  # tokens already streamed
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    # this sample's token logprobs are -logprob_scale * U(0, 1) drawn from lp_rng (apart
    # from the token stream, so a seed gives the same tokens however they are streamed):
    # samples differ in confidence, so best-logprob aggregation has something to choose
    lp_rng: random.Random = field(default_factory=random.Random)
    logprob_scale: float = 1.0


@dataclass(eq=False, slots=True)
class _Call:
    """One Generate call: its samples and the queue its stream reads from."""

    request_id: str
    prompt_len: int
    mode: RequestMode
    hashes: list[int]
    samples: list[_Sample]
    queue: asyncio.Queue[engine_pb2.GenerateResponse | BaseException]
    attached: bool = True
    open_samples: int = 0
    stop_token_ids: frozenset[int] = frozenset()


class SimWorker:
    """A SimEngine driven in scaled wall time, with KV events translated for the router."""

    def __init__(self, engine: SimEngine, *, worker: str, model: str, time_scale: float,
                 vocab_size: int, address: str = "", stream_interval_s: float = 0.02) -> None:
        if time_scale <= 0 or not math.isfinite(time_scale):
            raise ValueError(f"time scale must be a positive number, got {time_scale}")
        self.engine = engine
        self.worker = worker
        self.model = model
        self.time_scale = time_scale
        self.vocab_size = vocab_size
        self.address = address
        self.block_size = engine.block_size
        # Streaming cadence while requests decode, in wall seconds.
        self.stream_interval_s = stream_interval_s
        self.publisher: EventPublisher | None = None
        self._t0 = time.monotonic()
        self._calls: dict[str, _Call] = {}
        self._by_req: dict[int, tuple[_Call, _Sample]] = {}
        self._blocks: dict[int, _CachedBlock] = {}
        self._pins: dict[int, int] = {}
        self._kick = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        # Context request ids: unique across restarts too, so that a restarted context worker
        # cannot hand out KV it no longer has under an old id.
        self._ctx_ids = itertools.count(random.SystemRandom().getrandbits(40) << 12)
        # KV left by finished context-only requests: ctx id -> (prompt tokens, block hashes)
        self._exports: dict[int, tuple[int, list[int]]] = {}
        self._last_report: LoadReport | None = None
        self.stats = WorkerStats()
        # Sessions' keep / host offload / reload (Engine.Offload / Reload); None: no host tier.
        self.kv: SessionKv | None = None

    def _held(self, h: int) -> bool:
        """A block the router may still hear about: pinned by a call, cached, or on host."""
        return (h in self._pins or self.engine.cache.contains(h)
                or (self.kv is not None and self.kv.on_host(h)))

    # time -------------------------------------------------------------------------
    def sim_now(self) -> float:
        return (time.monotonic() - self._t0) / self.time_scale

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive(), name=f"sim-driver-{self.worker}")

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        for call in list(self._calls.values()):
            call.queue.put_nowait(ConnectionAbortedError("engine shutting down"))

    # requests -----------------------------------------------------------------------
    def submit(self, request_id: str, tokens: Sequence[int], *, max_tokens: int, n: int = 1,
               mode: RequestMode = RequestMode.BOTH, extra_key: bytes | None = None,
               seed: int | None = None, stop_token_ids: Sequence[int] = ()) -> _Call:
        """Queue a request; ValueError on bad input, KeyError if the id is in flight.
        n > 1 samples share one prefill (samples 1.. fork from sample 0 once its prompt KV
        is computed); a sample that draws a stop token ends there (finish reason "stop")."""
        if request_id in self._calls:
            raise KeyError(request_id)
        prompt = len(tokens)
        if prompt <= 0:
            raise ValueError("prompt is empty")
        if not 1 <= n <= 64:
            raise ValueError(f"n (parallel samples) must be 1..64, got {n}")
        bs = self.block_size
        hashes = list(hash_blocks(tokens, bs, extra_key))
        now = self.sim_now()
        call = _Call(request_id, prompt, mode, hashes, [], asyncio.Queue(),
                     stop_token_ids=frozenset(stop_token_ids))
        # a session's blocks still being copied in by Engine.Reload: the prefill overlaps
        # the copy layer by layer (host_tier.SessionKv.loading_until, as in bench/agentic)
        load_until = self.kv.loading_until(hashes, now) if self.kv is not None else 0.0
        for i in range(n):
            rid = request_id if n == 1 else f"{request_id}#{i}"
            req = SimRequest(request_id=rid, hashes=hashes, prompt_tokens=prompt,
                             max_tokens=max_tokens, mode=mode, record_tokens=True,
                             fork_of=call.samples[0].req if i else None,
                             load_until=load_until)
            base = seed if seed is not None else zlib.crc32(request_id.encode())
            lp_rng = random.Random(base * 1000003 + i + 0x5EED)
            call.samples.append(_Sample(req, i, random.Random(base * 1000003 + i),
                                        lp_rng=lp_rng, logprob_scale=lp_rng.uniform(0.2, 2.0)))
        # Remember every full block's tokens before the core can store it.
        for i, h in enumerate(hashes):
            if h not in self._blocks:
                self._blocks[h] = _CachedBlock(tuple(tokens[i * bs:(i + 1) * bs]),
                                         hashes[i - 1] if i else None, i, extra_key or None)
            self._pins[h] = self._pins.get(h, 0) + n
        self._calls[request_id] = call
        for s in call.samples:
            self.engine.submit(s.req, now)  # raises nothing for validated input
            self._by_req[id(s.req)] = (call, s)
            call.open_samples += 1
        self.stats.requests += 1
        self._drain(now)  # a rejection is known at once
        self._kick.set()
        return call

    def detach(self, call: _Call) -> None:
        """The caller went away (or the router stopped its samples): the samples still
        running are aborted in the core and their KV blocks freed, as vLLM aborts a request
        whose client disconnects."""
        if call.attached and call.open_samples:
            self.stats.abandoned += 1
        call.attached = False
        now = self.sim_now()
        for s in call.samples:
            if not s.done:
                self.engine.cancel(s.req, now)
                self._close_sample(call, s)
        self._kick.set()

    def load(self) -> LoadReport:
        self.engine.run_until(self.sim_now())
        self._kick.set()  # the driver streams what run_until produced
        return self.engine.load_report()

    # the driver ---------------------------------------------------------------------
    async def _drive(self) -> None:
        while True:
            try:
                now = self.sim_now()
                self.engine.run_until(now)
                self._drain(now)
                wake = self.engine.next_wakeup()
                if self._by_req:
                    # decodes in a long stretch produce tokens before next_wakeup(): stream them
                    wake = min(wake, now + self.stream_interval_s / self.time_scale)
                delay = (wake - self.sim_now()) * self.time_scale
                if not delay > 0:
                    delay = 0.0005  # run_until(now) already did what was due; never spin
            except Exception:  # the core is pure: a failure is a bug; keep serving others
                log.exception("simulated engine step failed", extra={"worker": self.worker})
                delay = 0.05
            self._kick.clear()
            timeout = None if math.isinf(delay) else delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    def _drain(self, now: float) -> None:
        for up in self.engine.drain_updates():
            entry = self._by_req.get(id(up.request))
            if entry is None:
                continue
            call, sample = entry
            if up.kind == "rejected":
                self._close_sample(call, sample)
                self.stats.rejected += 1
                if call.attached:
                    call.queue.put_nowait(Rejected(
                        f"prompt of {call.prompt_len} tokens does not fit in the KV cache "
                        f"({self.engine.cache.num_blocks} blocks of {self.block_size})"))
            elif up.kind == "preempted":
                self.stats.preempted += 1
        for call, sample in list(self._by_req.values()):
            self._stream(call, sample)
        self._publish(self.engine.drain_kv_events())
        self._report_load()

    def _report_load(self) -> None:
        pub = self.publisher
        if pub is None:
            return
        report = self.engine.load_report()
        if report != self._last_report:
            # The publisher sends it as soon as its rate cap allows, even if we go idle.
            self._last_report = report
            pub.report_load(report)

    def _stream(self, call: _Call, sample: _Sample) -> None:
        req = sample.req
        times = req.token_times
        new = len(times) - sample.sent
        finished = req.finish_time is not None
        if new <= 0 and not finished:
            return
        toks = [sample.rng.randrange(self.vocab_size) for _ in range(max(0, new))]
        stopped = False
        if call.stop_token_ids:
            for j, t in enumerate(toks):
                if t in call.stop_token_ids:  # the stop token itself is not returned
                    toks, stopped, finished = toks[:j], True, True
                    self.engine.cancel(req, self.sim_now())
                    break
        sample.tokens.extend(toks)
        sample.sent = len(times)
        if finished:
            self._close_sample(call, sample)
        if not call.attached:
            return
        lp = sample.logprob_scale
        resp = engine_pb2.GenerateResponse(request_id=call.request_id, token_ids=toks,
                                           sample_index=sample.index, worker=self.worker,
                                           logprobs=[-lp * sample.lp_rng.random() for _ in toks])
        if finished:
            reason = "stop" if stopped else "length"
            if call.mode is RequestMode.CONTEXT_ONLY:
                reason = "context_done"
                ctx_id = next(self._ctx_ids)
                self._export(ctx_id, call)
                resp.disaggregated.CopyFrom(common_pb2.DisaggregatedParams(
                    request_type=common_pb2.REQUEST_TYPE_CONTEXT_ONLY,
                    first_gen_tokens=sample.tokens[:1], ctx_request_id=ctx_id,
                    ctx_worker_address=self.address,
                    opaque_state=f"sim:{self.worker}:{ctx_id}:{call.prompt_len}".encode()))
            resp.finished = True
            resp.finish_reason = reason
            hit = max(0, req.hit_blocks)
            cached = call.prompt_len if call.mode is RequestMode.GENERATION_ONLY else hit * self.block_size
            resp.usage.CopyFrom(common_pb2.Usage(prompt_tokens=call.prompt_len,
                                                 cached_tokens=min(cached, call.prompt_len),
                                                 completion_tokens=len(sample.tokens)))
        call.queue.put_nowait(resp)

    # KV handover (disaggregated serving) ------------------------------------------------
    MAX_EXPORTS = 4096

    def _export(self, ctx_id: int, call: _Call) -> None:
        self._exports[ctx_id] = (call.prompt_len, list(call.hashes))
        while len(self._exports) > self.MAX_EXPORTS:  # oldest first (dicts keep order)
            del self._exports[next(iter(self._exports))]

    def transfer_kv(self, ctx_id: int) -> int:
        """Prompt tokens of a finished context request whose KV can still be handed over;
        KeyError (with the reason) when it cannot."""
        entry = self._exports.get(ctx_id)
        if entry is None:
            raise KeyError(f"no context request {ctx_id} on worker {self.worker!r}")
        prompt_len, hashes = entry
        cache = self.engine.cache
        missing = sum(1 for h in hashes if not cache.contains(h))
        if missing:
            del self._exports[ctx_id]
            raise KeyError(f"KV of context request {ctx_id} was evicted from worker "
                           f"{self.worker!r} ({missing} of {len(hashes)} blocks gone)")
        return prompt_len

    def _close_sample(self, call: _Call, sample: _Sample) -> None:
        if sample.done:
            return
        sample.done = True
        self._by_req.pop(id(sample.req), None)
        call.open_samples -= 1
        for h in call.hashes:
            c = self._pins.get(h, 0) - 1
            if c > 0:
                self._pins[h] = c
                continue
            self._pins.pop(h, None)
            if not self._held(h):
                self._blocks.pop(h, None)
        if call.open_samples == 0:
            self._calls.pop(call.request_id, None)

    # events -------------------------------------------------------------------------
    def _publish(self, events: list[KvEvent]) -> None:
        if not events:
            return
        out = [self._translate(ev) for ev in events]
        self.stats.events += len(out)
        if self.publisher is not None:
            self.publisher.publish(out)

    def _translate(self, ev: KvEvent) -> KvEvent:
        """The core names blocks by hash only; the router wants their token ids."""
        if isinstance(ev, BlockStored):
            blocks = [self._blocks[h] for h in ev.hashes]
            tokens = tuple(t for b in blocks for t in b.tokens)
            return BlockStored(hashes=ev.hashes, parent=ev.parent, token_ids=tokens,
                               block_size=self.block_size, tier=ev.tier,
                               extra_key=blocks[0].extra_key)
        if isinstance(ev, BlockRemoved):
            for h in ev.hashes:
                if not self._held(h):
                    self._blocks.pop(h, None)
            return ev
        if isinstance(ev, AllCleared):
            for h in [h for h in self._blocks if not self._held(h)]:
                del self._blocks[h]
        return ev

    def dump(self) -> list[KvEvent]:
        """Every cached block as BlockStored, parents first (the publisher's full dump)."""
        held = sorted(self.engine.cache.hashes(), key=lambda h: self._blocks[h].depth)
        out: list[KvEvent] = []
        for h in held:
            b = self._blocks[h]
            out.append(BlockStored(hashes=(h,), parent=b.parent, token_ids=b.tokens,
                                   block_size=self.block_size, extra_key=b.extra_key))
        if self.kv is not None:  # host copies, tier-tagged
            for h in sorted(self.kv.host_hashes(), key=lambda h: self._blocks[h].depth):
                b = self._blocks[h]
                out.append(BlockStored(hashes=(h,), parent=b.parent, token_ids=b.tokens,
                                       block_size=self.block_size, extra_key=b.extra_key,
                                       tier=Tier.HOST))
        return out


class Rejected(Exception):
    """A request the engine cannot run at all (its prompt does not fit in the KV cache)."""
