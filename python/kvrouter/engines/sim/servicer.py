"""The kvrouter.v1.Engine gRPC service of a simulated engine (one SimWorker).

Generate streams a SimWorker's tokens; a GENERATION_ONLY request carrying a context
worker's DisaggregatedParams first pulls the KV from it (Engine.TransferKv: the
context worker checks that the blocks are still cached), then the core imports it
over the link before decoding. A context worker that died or evicted the blocks
makes the pull fail, and the generation request fails with FAILED_PRECONDITION
("KV lost"), which tells the router to prefill again.

Offload / Reload keep, offload and reload a session's KV (kvrouter.engines.sim.offload,
on the host tier of host_tier.py; UNIMPLEMENTED when started without one). A Generate
whose caller goes away (or cancels the stream, as the router does when a vote is
decided) aborts its samples still running and frees their KV blocks.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.engines.sim.engine import RequestMode
from kvrouter.engines.sim.offload import note_session, offload, reload
from kvrouter.engines.sim.worker import Rejected, SimWorker
from kvrouter.protocol import decode_prompt, extra_key_for, load_report_pb
from kvrouter.security.channels import aio_channel

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 1 << 20

_MODE = {
    common_pb2.REQUEST_TYPE_UNSPECIFIED: RequestMode.BOTH,
    common_pb2.REQUEST_TYPE_CONTEXT_AND_GENERATION: RequestMode.BOTH,
    common_pb2.REQUEST_TYPE_CONTEXT_ONLY: RequestMode.CONTEXT_ONLY,
    common_pb2.REQUEST_TYPE_GENERATION_ONLY: RequestMode.GENERATION_ONLY,
}


def _abort_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, Rejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


class SimEngineService(engine_pb2_grpc.EngineServicer):
    """The Engine gRPC API of one SimWorker."""

    def __init__(self, sim: SimWorker, role: str, max_prompt_tokens: int,
                 transfer_timeout_s: float = 5.0) -> None:
        self.sim = sim
        self.role = role
        self.max_prompt_tokens = max_prompt_tokens
        self.transfer_timeout_s = transfer_timeout_s
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._rid = itertools.count(1)
        self._rid_prefix = f"{sim.worker}-{uuid.uuid4().hex[:6]}-"

    def _tokens(self, req: engine_pb2.GenerateRequest) -> list[int]:
        tokens: list[int] = decode_prompt(req.token_ids, req.token_ids_le,
                                          max_prompt_tokens=self.max_prompt_tokens,
                                          vocab_size=self.sim.vocab_size).tolist()
        return tokens

    async def Generate(self, request: engine_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        sp = request.sampling
        try:
            tokens = self._tokens(request)
            max_tokens = sp.max_tokens or DEFAULT_MAX_TOKENS
            if not 0 < max_tokens <= MAX_TOKENS_LIMIT:
                raise ValueError(f"sampling.max_tokens must be 0 (default {DEFAULT_MAX_TOKENS}) "
                                 f"or 1..{MAX_TOKENS_LIMIT}, got {sp.max_tokens}")
            mode = _MODE.get(request.disaggregated.request_type)
            if mode is None:
                raise ValueError(f"unknown request_type {request.disaggregated.request_type}")
            extra = extra_key_for(request.extra_key, request.lora_name)
            rid = request.request_id or f"{self._rid_prefix}{next(self._rid)}"
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort() always raises
        if mode is RequestMode.GENERATION_ONLY:
            lost = await self._pull_kv(request.disaggregated, len(tokens))
            if lost:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, lost)
                raise AssertionError("unreachable")  # pragma: no cover
        try:
            call = self.sim.submit(rid, tokens, max_tokens=max_tokens, n=max(1, sp.n), mode=mode,
                                   extra_key=extra, seed=sp.seed if sp.HasField("seed") else None,
                                   stop_token_ids=sp.stop_token_ids)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort() always raises
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request.request_id!r} is already running here")
            raise
        if request.session_id:  # the session's chain, for Offload (a keep's pin ends here)
            note_session(self.sim, request.session_id, call.hashes)
        remaining = len(call.samples)
        try:
            while remaining:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    await context.abort(_abort_code(item), str(item))
                    return
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self.sim.detach(call)

    async def _pull_kv(self, params: common_pb2.DisaggregatedParams, prompt_len: int) -> str:
        """Fetch the context's KV from the worker that computed it; '' or why it is lost.
        Without a context worker address the KV is taken as given (imported, not checked)."""
        peer = params.ctx_worker_address
        if not peer or peer == self.sim.address:
            return ""
        ch = self._peers.get(peer)
        if ch is None:
            # TLS and token of this process (KVROUTER_TLS_*, kvrouter.security.channels).
            ch = self._peers[peer] = aio_channel(peer)
        stub = engine_pb2_grpc.EngineStub(ch)
        try:
            resp = await stub.TransferKv(
                engine_pb2.TransferKvRequest(ctx_request_id=params.ctx_request_id,
                                             opaque_state=params.opaque_state,
                                             requester=self.sim.worker),
                timeout=self.transfer_timeout_s)
        except grpc.aio.AioRpcError as e:
            return (f"KV of context request {params.ctx_request_id} is lost: context worker "
                    f"{peer} answered {e.code().name}: {e.details()}")
        if resp.tokens < prompt_len - self.sim.block_size:
            # generation continues after the context's prompt: most of it must be there
            return (f"context request {params.ctx_request_id} holds KV of {resp.tokens} tokens, "
                    f"the request has {prompt_len}")
        return ""

    async def TransferKv(self, request: engine_pb2.TransferKvRequest,
                         context: grpc.aio.ServicerContext) -> engine_pb2.TransferKvResponse:
        sim = self.sim
        sim.load()  # bring the cache up to now: evictions that happened count
        try:
            tokens = sim.transfer_kv(request.ctx_request_id)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
            raise AssertionError("unreachable") from None  # pragma: no cover
        return engine_pb2.TransferKvResponse(
            tokens=tokens, bytes=tokens * sim.engine.profile.kv_bytes_per_token)

    async def close(self) -> None:
        peers, self._peers = self._peers, {}
        for ch in peers.values():
            with contextlib.suppress(Exception):
                await ch.close()

    async def Stats(self, request: engine_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> engine_pb2.StatsResponse:
        sim = self.sim
        ld = sim.load()
        st = sim.engine.stats
        return engine_pb2.StatsResponse(
            worker=sim.worker, model=sim.model, block_size=sim.block_size,
            load=load_report_pb(ld),
            kv_total_blocks=sim.engine.cache.num_blocks,
            kv_host_blocks=sim.kv.host_used if sim.kv is not None else 0, kv_disk_blocks=0,
            events_published=sim.publisher.stats.events if sim.publisher is not None else 0,
            extra={"sim_time_s": sim.sim_now(), "time_scale": sim.time_scale,
                   "cached_blocks": float(sim.engine.cache.cached_blocks),
                   "steps": float(st.steps), "busy_s": st.busy_s,
                   "prefill_tokens": float(st.prefill_tokens),
                   "reused_tokens": float(st.reused_tokens),
                   "decode_tokens": float(st.decode_tokens),
                   "preemptions": float(st.preemptions), "finished": float(st.finished),
                   "rejected": float(st.rejected), "requests": float(sim.stats.requests),
                   "host_load_waits": float(st.load_waits), "host_load_wait_s": st.load_wait_s,
                   "abandoned": float(sim.stats.abandoned)})

    async def Offload(self, request: engine_pb2.OffloadRequest,
                      context: grpc.aio.ServicerContext) -> engine_pb2.OffloadResponse:
        """TIER_HOST (or unspecified): copy the session's KV to host, free its GPU blocks;
        TIER_GPU: keep it pinned on the GPU until Reload or its next request (host_tier.py)."""
        return await offload(self.sim, request, context)

    async def Reload(self, request: engine_pb2.ReloadRequest,
                     context: grpc.aio.ServicerContext) -> engine_pb2.ReloadResponse:
        return await reload(self.sim, request, context)
