"""TensorRT-LLM worker: a `tensorrt_llm.LLM` behind the Engine gRPC service, publishing
its KV cache events and load into the router's event plane.

    kvrouter engine trtllm --model PATH --role prefill|decode|aggregated --redis URL ...

* KV events: the LLM is built with `KvCacheConfig(enable_block_reuse=True,
  event_buffer_max_size > 0)`. Events can be read only once, so this worker is
  the only reader of `get_kv_cache_events_async`; each event is translated by
  kvrouter.engines.trtllm.translate (one translator, all event types) and
  published per attention-DP rank, each rank its own worker
  (`worker_id_for_rank`: "<worker>/dp<rank>"). A jump in event ids (the engine's
  event buffer overflowed) makes that rank start over: a new epoch, empty,
  since the lost events may have removed blocks.
* Full dumps for routers come from a BlockMirror per rank (kvrouter.engines.block_mirror),
  fed with the same translated events.
* Load: iteration stats from `get_stats_async` (numActiveRequests,
  numQueuedRequests, kvCacheStats.usedNumBlocks / freeNumBlocks or maxNumBlocks)
  become LoadReports.
* Generate: streaming; CONTEXT_ONLY returns the first token and the
  DisaggregatedParams (ctx_request_id, opaque_state, ...) a GENERATION_ONLY
  request on a decode worker passes back in.

tensorrt_llm is optional (`pip install 'kvrouter[trtllm]'`) and imported only by
`import_trtllm()`; the worker itself takes any object with the LLM's async
methods, which is how it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.engines.block_mirror import BlockMirror
from kvrouter.engines.trtllm.retention import (
    Retention,
    RetentionError,
    SessionRetentions,
    retention_config,
    retention_for,
)
from kvrouter.engines.trtllm.translate import TrtllmTranslator, worker_id_for_rank
from kvrouter.events.model import KvEvent, LoadReport
from kvrouter.events.publisher import EventPublisher
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.grpc_server import ENGINE_SERVICE, GrpcServer, unimplemented
from kvrouter.mainloop import stop_on_signals
from kvrouter.protocol import ProtocolError, decode_prompt, extra_key_for, load_report_pb
from kvrouter.registry import Role
from kvrouter.retry import Backoff
from kvrouter.sampling import sampling_kwargs
from kvrouter.security.router import EngineSecurity

log = logging.getLogger("kvrouter.engines.trtllm")

ROLES: tuple[str, ...] = tuple(r.value for r in Role)
INSTALL_HINT = ("TensorRT-LLM is not installed. Install it with `pip install 'kvrouter[trtllm]'` "
                "(or NVIDIA's TensorRT-LLM container) on a machine with an NVIDIA GPU; see "
                "engines/trtllm/README.md.")

_REQUEST_TYPES = {
    common_pb2.REQUEST_TYPE_UNSPECIFIED: "context_and_generation",
    common_pb2.REQUEST_TYPE_CONTEXT_AND_GENERATION: "context_and_generation",
    common_pb2.REQUEST_TYPE_CONTEXT_ONLY: "context_only",
    common_pb2.REQUEST_TYPE_GENERATION_ONLY: "generation_only",
}


class TrtllmUnavailable(RuntimeError):
    pass


def import_trtllm() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise TrtllmUnavailable(f"{INSTALL_HINT} ({exc})") from exc
    return tensorrt_llm


@dataclass
class TrtllmApi:
    """The tensorrt_llm constructors the worker calls (keyword arguments as TensorRT-LLM names them)."""

    sampling_params: Callable[..., Any]
    disaggregated_params: Callable[..., Any]
    # KvCacheRetentionConfig and its TokenRangeRetentionConfig (sessions' tool pauses,
    # kvrouter.engines.trtllm.retention); None: requests keep TensorRT-LLM's defaults
    kv_retention: Callable[..., Any] | None = None
    token_range: Callable[..., Any] | None = None

    @classmethod
    def load(cls) -> TrtllmApi:
        trt = import_trtllm()
        from tensorrt_llm.llmapi import DisaggregatedParams, KvCacheRetentionConfig

        return cls(trt.SamplingParams, DisaggregatedParams, KvCacheRetentionConfig,
                   KvCacheRetentionConfig.TokenRangeRetentionConfig)


class TrtllmRequestError(ValueError):
    """A request this worker refuses; `code` is the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_from_stats(stats: Any) -> LoadReport | None:
    """One iteration-stats record (dict or its JSON text) -> LoadReport; None if unusable."""
    if isinstance(stats, str | bytes):
        try:
            stats = json.loads(stats)
        except ValueError:
            return None
    if not isinstance(stats, dict):
        return None

    def count(d: Any, key: str) -> int:
        v = d.get(key) if isinstance(d, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    kv = stats.get("kvCacheStats") or {}
    used = count(kv, "usedNumBlocks")
    free = count(kv, "freeNumBlocks") if "freeNumBlocks" in kv else max(
        0, count(kv, "maxNumBlocks") - used)
    # maxNumBlocks is the GPU pool's capacity (used + free when the stats lack it).
    capacity = count(kv, "maxNumBlocks") or used + free
    return LoadReport(running=count(stats, "numActiveRequests"),
                      queued=count(stats, "numQueuedRequests"), kv_used_blocks=used,
                      kv_free_blocks=free, kv_capacity_blocks=capacity)


@dataclass
class _Rank:
    publisher: EventPublisher
    mirror: BlockMirror = field(default_factory=BlockMirror)


class TrtllmWorker:
    """Drains one LLM's KV events and stats into publishers; runs its requests."""

    def __init__(self, llm: Any, api: TrtllmApi, *, model: str, worker: str,
                 tokens_per_block: int, publisher_factory: Callable[[str], EventPublisher],
                 role: str = "aggregated", attention_dp_size: int = 0,
                 events_timeout_s: float = 2.0, stats_timeout_s: float = 2.0,
                 window_size: int | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.llm = llm
        self.api = api
        self.model = model
        self.worker = worker
        self.role = role
        self.tokens_per_block = tokens_per_block
        self.attention_dp_size = attention_dp_size
        self.events_timeout_s = events_timeout_s
        self.stats_timeout_s = stats_timeout_s
        self.translator = TrtllmTranslator(tokens_per_block, window_size)
        self._factory = publisher_factory
        self.ranks: dict[int | None, _Rank] = {}
        self.load: LoadReport | None = None
        self.capacity: dict[int, int] = {}  # cache level -> blocks (rank 0 / no DP)
        self.retentions = SessionRetentions()  # sessions' tool-pause retention (Offload)
        self.epochs_lost = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False

    # ranks ---------------------------------------------------------------------------
    def _rank_key(self, rank: int | None) -> int | None:
        # Without attention DP every event belongs to the one worker, whatever rank it names.
        return rank if self.attention_dp_size > 0 else None

    async def _rank(self, rank: int | None) -> _Rank:
        key = self._rank_key(rank)
        r = self.ranks.get(key)
        if r is None:
            pub = self._factory(worker_id_for_rank(self.worker, key))
            r = _Rank(pub)
            pub.dump = r.mirror.dump
            pub.block_size = self.tokens_per_block
            pub.extra_meta.update({"engine": "trtllm", "engine_block_size":
                                   str(self.tokens_per_block)})
            self.ranks[key] = r
            if self._running:
                await pub.start()
        return r

    # lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        for rank in (range(self.attention_dp_size) if self.attention_dp_size else [None]):
            await self._rank(rank)
        self._running = True
        for r in self.ranks.values():
            await r.publisher.start()
        self._tasks = [asyncio.create_task(self._events_loop(), name="trtllm-kv-events"),
                       asyncio.create_task(self._stats_loop(), name="trtllm-stats")]

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for r in self.ranks.values():
            await r.publisher.stop()

    # KV events -----------------------------------------------------------------------
    async def _events_loop(self) -> None:
        delays = Backoff(0.1, 2.0)
        while self._running:
            try:
                async for raw in self.llm.get_kv_cache_events_async(self.events_timeout_s):
                    await self.handle_event(raw)
                delays.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # engine hiccup: keep draining, events are buffered there
                log.warning("reading kv cache events failed: worker=%s error=%r", self.worker, exc)
                await delays.wait()

    async def handle_event(self, raw: Any) -> None:
        tr = self.translator.translate([raw])
        for cap in tr.capacity:
            if cap.dp_rank in (None, 0):
                self.capacity[cap.cache_level] = cap.num_blocks
        for gap in tr.event_id_gaps:
            r = await self._rank(gap.dp_rank)
            self.epochs_lost += 1
            log.warning("kv event ids skipped (engine event buffer overflowed?), rank starts "
                        "over: worker=%s rank=%s missing=%d", self.worker, gap.dp_rank,
                        gap.missing)
            r.mirror.clear()
            r.publisher.request_resync("engine events lost")
        for group in tr.groups:
            if not group.events:
                continue
            r = await self._rank(group.dp_rank)
            events: list[KvEvent] = group.events
            r.mirror.apply(events)
            r.publisher.publish(events)

    # load ----------------------------------------------------------------------------
    async def _stats_loop(self) -> None:
        delays = Backoff(0.1, 2.0)
        while self._running:
            try:
                async for stats in self.llm.get_stats_async(self.stats_timeout_s):
                    report = load_from_stats(stats)
                    if report is None:
                        continue
                    self.load = report
                    # Iteration stats are the executor's: every rank gets them.
                    for r in self.ranks.values():
                        r.publisher.report_load(report)
                delays.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading iteration stats failed: worker=%s error=%r", self.worker, exc)
                await delays.wait()

    # requests --------------------------------------------------------------------------
    def build_request(self, req: engine_pb2.GenerateRequest) -> tuple[list[int], Any, Any, str]:
        """(token ids, SamplingParams, DisaggregatedParams | None, request type) or TrtllmRequestError."""
        inv = grpc.StatusCode.INVALID_ARGUMENT
        try:
            tokens: list[int] = decode_prompt(req.token_ids, req.token_ids_le).tolist()
        except ProtocolError as exc:
            raise TrtllmRequestError(inv, str(exc)) from None
        if extra_key_for(req.extra_key, req.lora_name) is not None:
            raise TrtllmRequestError(inv, "LoRA adapters / extra_key are not configured on this "
                                    "TensorRT-LLM worker")
        kind = _REQUEST_TYPES.get(req.disaggregated.request_type)
        if kind is None:
            raise TrtllmRequestError(inv, f"unknown request_type {req.disaggregated.request_type}")
        pre = grpc.StatusCode.FAILED_PRECONDITION
        if kind == "context_only" and self.role == "decode":
            raise TrtllmRequestError(pre, "a decode worker does not run CONTEXT_ONLY requests")
        if kind == "generation_only" and self.role == "prefill":
            raise TrtllmRequestError(pre, "a prefill worker does not run GENERATION_ONLY requests")
        if kind == "context_and_generation" and self.role != "aggregated":
            raise TrtllmRequestError(pre, f"a {self.role} worker only runs "
                               f"{'CONTEXT' if self.role == 'prefill' else 'GENERATION'}_ONLY "
                               "requests")
        s = req.sampling
        if s.max_tokens < 0:
            raise TrtllmRequestError(inv, f"max_tokens must be >= 0, got {s.max_tokens}")
        kw: dict[str, Any] = {"max_tokens": s.max_tokens or 16}
        if kind == "context_only":
            kw["max_tokens"] = 1  # the context phase produces exactly the first token
        kw.update(sampling_kwargs(s, with_n=True))
        disagg = None
        d = req.disaggregated
        if kind != "context_and_generation":
            dkw: dict[str, Any] = {"request_type": kind}
            if kind == "generation_only":
                if not d.first_gen_tokens or not (d.opaque_state or d.ctx_request_id):
                    raise TrtllmRequestError(inv, "GENERATION_ONLY needs the context phase's "
                                            "first_gen_tokens and ctx_request_id / opaque_state")
                dkw.update(first_gen_tokens=list(d.first_gen_tokens),
                           ctx_request_id=d.ctx_request_id, opaque_state=d.opaque_state or None,
                           draft_tokens=list(d.draft_tokens) or None)
            disagg = self.api.disaggregated_params(**dkw)
        return tokens, self.api.sampling_params(**kw), disagg, kind

    async def generate(self, req: engine_pb2.GenerateRequest
                       ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        tokens, sampling, disagg, kind = self.build_request(req)
        kwargs: dict[str, Any] = {"sampling_params": sampling, "streaming": True}
        if disagg is not None:
            kwargs["disaggregated_params"] = disagg
        retention = self._retention(req)
        if retention is not None and self.api.kv_retention and self.api.token_range:
            kwargs["kv_cache_retention_config"] = retention_config(
                self.api.kv_retention, self.api.token_range, retention)
        result = self.llm.generate_async(tokens, **kwargs)
        if req.session_id:
            self.retentions.record(req.session_id, retention)
        sent: dict[int, int] = {}
        last: Any = None
        try:
            async for out in result:
                last = out
                for i, o in enumerate(out.outputs):
                    ids = list(o.token_ids)
                    new = ids[sent.get(i, 0):]
                    sent[i] = len(ids)
                    if new:
                        yield engine_pb2.GenerateResponse(request_id=req.request_id,
                                                          token_ids=new, sample_index=i)
        except asyncio.CancelledError:
            abort = getattr(result, "abort", None)
            if callable(abort):
                abort()
            raise
        if last is None:
            raise TrtllmRequestError(grpc.StatusCode.INTERNAL, "the engine returned no output")
        for i, o in enumerate(last.outputs):
            resp = engine_pb2.GenerateResponse(
                request_id=req.request_id, finished=True, sample_index=i,
                finish_reason=str(getattr(o, "finish_reason", None) or "length"),
                usage=common_pb2.Usage(prompt_tokens=len(tokens),
                                       cached_tokens=int(getattr(last, "cached_tokens", 0) or 0),
                                       completion_tokens=len(o.token_ids)))
            if kind == "context_only":
                resp.disaggregated.CopyFrom(_disagg_to_proto(
                    getattr(o, "disaggregated_params", None), list(o.token_ids)))
            yield resp

    def _retention(self, req: engine_pb2.GenerateRequest) -> Retention | None:
        if not req.session_id:
            return None
        try:
            return retention_for(req.tool_pause_s, req.tool_kv_action)
        except RetentionError as e:
            raise TrtllmRequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def stats_response(self) -> engine_pb2.StatsResponse:
        ld = self.load or LoadReport()
        return engine_pb2.StatsResponse(
            worker=self.worker, model=self.model, block_size=self.tokens_per_block,
            load=load_report_pb(ld),
            kv_total_blocks=self.capacity.get(0, ld.kv_used_blocks + ld.kv_free_blocks),
            kv_host_blocks=self.capacity.get(1, 0),
            events_published=sum(r.publisher.stats.events for r in self.ranks.values()),
            extra={"mirror_blocks": float(sum(len(r.mirror) for r in self.ranks.values())),
                   "epochs_lost": float(self.epochs_lost),
                   "malformed_events": float(self.translator.malformed)})


def _disagg_to_proto(params: Any, first_tokens: list[int]) -> common_pb2.DisaggregatedParams:
    out = common_pb2.DisaggregatedParams(request_type=common_pb2.REQUEST_TYPE_CONTEXT_ONLY)
    gen = list(getattr(params, "first_gen_tokens", None) or first_tokens)
    out.first_gen_tokens.extend(gen)
    out.ctx_request_id = int(getattr(params, "ctx_request_id", None) or 0)
    state = getattr(params, "opaque_state", None)
    if state:
        out.opaque_state = bytes(state)
    out.draft_tokens.extend(list(getattr(params, "draft_tokens", None) or []))
    return out


class TrtllmEngineService(engine_pb2_grpc.EngineServicer):
    """The Engine gRPC API of one TrtllmWorker."""

    def __init__(self, worker: TrtllmWorker) -> None:
        self.worker = worker

    async def Generate(self, request: engine_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[
                           engine_pb2.GenerateResponse]:
        try:
            async for resp in self.worker.generate(request):
                yield resp
        except TrtllmRequestError as exc:
            await context.abort(exc.code, str(exc))

    async def Offload(self, request: engine_pb2.OffloadRequest,
                      context: grpc.aio.ServicerContext) -> engine_pb2.OffloadResponse:
        """Confirms the retention the session's last turn got at submission
        (kvrouter.engines.trtllm.retention): TensorRT-LLM moves the blocks itself."""
        if request.target == common_pb2.TIER_DISK:
            await unimplemented(context, "no disk tier through this adapter")
        r = self.worker.retentions.get(request.session_id)
        if r is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session {request.session_id[:64]!r} has no tool-pause retention "
                                "here (its last turn carried no tool_pause_s, or it lapsed)")
            raise AssertionError("unreachable")  # pragma: no cover
        if r.action == "drop":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the session's blocks were submitted to be dropped (priority "
                                f"{r.priority}); TensorRT-LLM cannot change it afterwards")
        # the retention set at submission decides, whatever the target: answer where the
        # blocks wait (keep: GPU; offload: host once the GPU needs the room)
        tier = common_pb2.TIER_GPU if r.action == "keep" else common_pb2.TIER_HOST
        return engine_pb2.OffloadResponse(blocks=0, tier=tier)

    async def Reload(self, request: engine_pb2.ReloadRequest,
                     context: grpc.aio.ServicerContext) -> engine_pb2.ReloadResponse:
        """TensorRT-LLM onboards host blocks itself when the next turn reuses them: 0 blocks."""
        if self.worker.retentions.get(request.session_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session {request.session_id[:64]!r} has no tool-pause retention "
                                "here")
        return engine_pb2.ReloadResponse(blocks=0)

    async def Stats(self, request: engine_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> engine_pb2.StatsResponse:
        return self.worker.stats_response()


async def serve_worker(worker: TrtllmWorker, listen: str) -> GrpcServer:
    """Start the Engine gRPC service (with standard health and reflection) for a started
    worker; raises kvrouter.grpc_server.ListenError (a RuntimeError) when `listen` is taken."""
    sec = EngineSecurity.from_env(listen)  # KVROUTER_TLS_*, KVROUTER_AUTH_FILE
    server = GrpcServer(listen, [ENGINE_SERVICE], tls=sec.tls, interceptors=sec.interceptors)
    engine_pb2_grpc.add_EngineServicer_to_server(TrtllmEngineService(worker), server.server)
    await server.start()
    await server.set_serving()
    return server


# --------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    """`kvrouter engine trtllm ...` (called by kvrouter.engines.commands)."""
    p = subparsers.add_parser(
        "trtllm", help="serve a TensorRT-LLM model as a kvrouter worker",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build a tensorrt_llm.LLM with KV cache events on, serve the Engine gRPC "
                    "API and publish KV events and load to the router's Redis.")
    p.add_argument("--model", required=True, help="HF model directory or engine path")
    p.add_argument("--served-model", default=None, help="model name in the router (default: "
                   "the last path component of --model)")
    p.add_argument("--role", default="aggregated", choices=ROLES)
    p.add_argument("--worker-id", required=True, help="worker name in the router")
    p.add_argument("--listen", default="0.0.0.0:50061", help="Engine gRPC host:port")
    p.add_argument("--address", default="", help="address routers use to reach this worker "
                   "(default: --listen)")
    p.add_argument("--redis", required=True, metavar="URL", help="the router's Redis")
    p.add_argument("--namespace", default="kvrouter")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--tokens-per-block", type=int, default=32,
                   help="KV block size; the router model's block size must divide it")
    p.add_argument("--event-buffer", type=int, default=16384,
                   help="KvCacheConfig.event_buffer_max_size (> 0)")
    p.add_argument("--kv-fraction", type=float, default=0.85,
                   help="KvCacheConfig.free_gpu_memory_fraction")
    p.add_argument("--host-cache-bytes", type=int, default=0,
                   help="KvCacheConfig.host_cache_size: offload evicted blocks to host memory")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--attention-dp", action="store_true",
                   help="enable_attention_dp: each of the --tp ranks is its own worker "
                        "(<worker-id>/dp<rank>)")
    p.add_argument("--backend", default="pytorch", help="LLM backend")
    p.add_argument("--heartbeat-ttl", type=float, default=3.0)
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=_cmd_trtllm)


def build_llm(args: argparse.Namespace) -> Any:
    """A tensorrt_llm.LLM with KV cache events and block reuse on."""
    trt = import_trtllm()
    from tensorrt_llm.llmapi import KvCacheConfig

    if args.event_buffer <= 0:
        raise ValueError("--event-buffer must be > 0: KV cache events are how the router learns")
    kv_kwargs: dict[str, Any] = {"enable_block_reuse": True,
                                 "event_buffer_max_size": args.event_buffer,
                                 "free_gpu_memory_fraction": args.kv_fraction}
    if args.host_cache_bytes:
        kv_kwargs["host_cache_size"] = args.host_cache_bytes
    try:
        kv = KvCacheConfig(tokens_per_block=args.tokens_per_block, **kv_kwargs)
        llm_extra: dict[str, Any] = {}
    except TypeError:  # older releases take tokens_per_block on the LLM / build config
        kv = KvCacheConfig(**kv_kwargs)
        llm_extra = {"tokens_per_block": args.tokens_per_block}
    llm_kwargs: dict[str, Any] = {"model": args.model, "kv_cache_config": kv,
                                  "tensor_parallel_size": args.tp, "backend": args.backend,
                                  **llm_extra}
    if args.attention_dp:
        llm_kwargs["enable_attention_dp"] = True
    if args.role != "aggregated":
        from tensorrt_llm.llmapi import CacheTransceiverConfig

        llm_kwargs["cache_transceiver_config"] = CacheTransceiverConfig(backend="DEFAULT")
    log.info("building tensorrt_llm.LLM: %s", {k: v for k, v in llm_kwargs.items()
                                                if k != "kv_cache_config"})
    return trt.LLM(**llm_kwargs)


def _cmd_trtllm(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.tokens_per_block <= 0:
        print("kvrouter engine trtllm: --tokens-per-block must be > 0", file=sys.stderr)
        return 2
    try:
        api = TrtllmApi.load()
        llm = build_llm(args)
    except TrtllmUnavailable as exc:
        print(f"kvrouter engine trtllm: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"kvrouter engine trtllm: {exc}", file=sys.stderr)
        return 2
    served = args.served_model or args.model.rstrip("/").rsplit("/", 1)[-1]
    return asyncio.run(_serve(args, llm, api, served))


async def _serve(args: argparse.Namespace, llm: Any, api: TrtllmApi, served: str) -> int:
    from kvrouter.events.publisher import redis_publisher

    address = args.address or args.listen

    def factory(name: str) -> EventPublisher:
        return redis_publisher(args.redis, served, name, namespace=args.namespace,
                               num_shards=args.num_shards, role=args.role, address=address,
                               block_size=args.tokens_per_block,
                               heartbeat_ttl_s=args.heartbeat_ttl)

    worker = TrtllmWorker(llm, api, model=served, worker=args.worker_id,
                          tokens_per_block=args.tokens_per_block, publisher_factory=factory,
                          role=args.role, attention_dp_size=args.tp if args.attention_dp else 0)
    await worker.start()
    server = await serve_worker(worker, args.listen)
    log.warning("trtllm worker serving: worker=%s model=%s role=%s listen=%s port=%d",
                args.worker_id, served, args.role, args.listen, server.port)
    stop = asyncio.Event()
    stop_on_signals(stop.set)
    t0 = time.monotonic()
    await stop.wait()
    await server.stop(5)
    await worker.stop()
    shutdown = getattr(llm, "shutdown", None)
    if callable(shutdown):
        shutdown()
    log.info("trtllm worker stopped after %.0f s", time.monotonic() - t0)
    return 0

