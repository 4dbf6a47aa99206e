"""How the router calls an engine in proxy mode (Router.Generate): one small interface,
one implementation per wire protocol, picked per worker by its registry metadata.

* ``grpc`` (default): the kvrouter.v1.Engine service (simulated engine, TensorRT-LLM
  adapter). Supports disaggregated requests (context only / generation only).
* ``openai``: an OpenAI-compatible completions server over HTTP (vLLM, SGLang), through
  `kvrouter.backends.openai_http`; aggregated requests only. Registry metadata
  ``backend=openai``; ``served_model`` names the model on that server when it differs
  from the router's model name.

Every failure becomes an `EngineFailure` whose `kind` tells the caller what it may do:
retry elsewhere (worker failed), re-prefill (the KV to import is gone), or give up
and tell the client (bad request, does not fit).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import grpc
import numpy as np

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.registry import WorkerInfo
from kvrouter.sampling import sampling_kwargs

log = logging.getLogger("kvrouter.server.backends")

BACKEND_METADATA_KEY = "backend"
SERVED_MODEL_METADATA_KEY = "served_model"


class RequestType(StrEnum):
    """Phase of a disaggregated request (TensorRT-LLM's DisaggregatedParams.request_type)."""

    CONTEXT_AND_GENERATION = "context_and_generation"
    CONTEXT_ONLY = "context_only"
    GENERATION_ONLY = "generation_only"


_TYPE_TO_PB = {
    RequestType.CONTEXT_AND_GENERATION: common_pb2.REQUEST_TYPE_CONTEXT_AND_GENERATION,
    RequestType.CONTEXT_ONLY: common_pb2.REQUEST_TYPE_CONTEXT_ONLY,
    RequestType.GENERATION_ONLY: common_pb2.REQUEST_TYPE_GENERATION_ONLY,
}
_TYPE_FROM_PB = {v: k for k, v in _TYPE_TO_PB.items()}
_TYPE_FROM_PB[common_pb2.REQUEST_TYPE_UNSPECIFIED] = RequestType.CONTEXT_AND_GENERATION


@dataclass(frozen=True, slots=True)
class DisaggParams:
    """What a context phase hands to the generation phase; the router passes it through."""

    request_type: RequestType
    first_gen_tokens: tuple[int, ...] = ()
    ctx_request_id: int = 0
    opaque_state: bytes = b""
    draft_tokens: tuple[int, ...] = ()
    ctx_worker_address: str = ""

    def to_pb(self) -> common_pb2.DisaggregatedParams:
        return common_pb2.DisaggregatedParams(
            request_type=_TYPE_TO_PB[self.request_type], first_gen_tokens=self.first_gen_tokens,
            ctx_request_id=self.ctx_request_id, opaque_state=self.opaque_state,
            draft_tokens=self.draft_tokens, ctx_worker_address=self.ctx_worker_address)

    @classmethod
    def from_pb(cls, pb: common_pb2.DisaggregatedParams) -> DisaggParams:
        return cls(request_type=_TYPE_FROM_PB.get(pb.request_type, RequestType.CONTEXT_AND_GENERATION),
                   first_gen_tokens=tuple(pb.first_gen_tokens), ctx_request_id=pb.ctx_request_id,
                   opaque_state=bytes(pb.opaque_state), draft_tokens=tuple(pb.draft_tokens),
                   ctx_worker_address=pb.ctx_worker_address)


@dataclass(slots=True)
class EngineCall:
    """One request to one engine."""

    request_id: str
    token_ids: np.ndarray  # uint32
    max_tokens: int
    sampling: common_pb2.SamplingParams
    request_type: RequestType = RequestType.CONTEXT_AND_GENERATION
    disagg: DisaggParams | None = None  # the context phase's params, for generation only
    extra_key: bytes = b""
    lora_name: str = ""
    session_id: str = ""


@dataclass(slots=True)
class EngineChunk:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    disagg: DisaggParams | None = None  # on the final chunk of a context-only call
    prompt_tokens: int = 0  # usage, on the final chunk when the engine reports it
    cached_tokens: int = 0
    completion_tokens: int = 0
    sample_index: int = 0


class FailureKind(StrEnum):
    WORKER = "worker"  # unreachable, died, internal error: try another worker
    KV_LOST = "kv_lost"  # generation only: the context's KV cannot be imported
    UNSUPPORTED = "unsupported"  # this engine cannot run this kind of request
    REJECTED = "rejected"  # does not fit (resource exhausted): tell the client
    INVALID = "invalid"  # the engine refused the request as malformed: tell the client


class EngineFailure(Exception):
    def __init__(self, kind: FailureKind, worker: str, message: str,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(f"worker {worker!r}: {message}")
        self.kind = kind
        self.worker = worker
        self.message = message
        self.code = code


class Backend(Protocol):
    supports_disaggregation: bool

    def generate(self, worker: WorkerInfo, model: str, call: EngineCall,
                 ) -> AsyncIterator[EngineChunk]: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- Engine gRPC

_GRPC_KIND: dict[grpc.StatusCode, FailureKind] = {
    grpc.StatusCode.FAILED_PRECONDITION: FailureKind.KV_LOST,
    grpc.StatusCode.UNIMPLEMENTED: FailureKind.UNSUPPORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: FailureKind.REJECTED,
    grpc.StatusCode.INVALID_ARGUMENT: FailureKind.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: FailureKind.INVALID,
    grpc.StatusCode.ALREADY_EXISTS: FailureKind.INVALID,
}


class GrpcEngineBackend:
    """kvrouter.v1.Engine over gRPC; one channel per engine address, reused."""

    supports_disaggregation = True

    def __init__(self, max_message_bytes: int = 64 << 20) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = ch
        return engine_pb2_grpc.EngineStub(ch)

    @staticmethod
    def request_pb(call: EngineCall) -> engine_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(call.sampling)
        sampling.max_tokens = call.max_tokens
        req = engine_pb2.GenerateRequest(
            request_id=call.request_id, token_ids_le=call.token_ids.astype("<u4").tobytes(),
            sampling=sampling, extra_key=call.extra_key, lora_name=call.lora_name,
            session_id=call.session_id)
        if call.disagg is not None:
            req.disaggregated.CopyFrom(call.disagg.to_pb())
        req.disaggregated.request_type = _TYPE_TO_PB[call.request_type]
        return req

    async def generate(self, worker: WorkerInfo, model: str, call: EngineCall,
                       ) -> AsyncIterator[EngineChunk]:
        if not worker.address:
            raise EngineFailure(FailureKind.WORKER, worker.name,
                                "registered without an engine address")
        stream = self._stub(worker.address).Generate(self.request_pb(call))
        try:
            async for resp in stream:
                chunk = EngineChunk(token_ids=list(resp.token_ids), finished=resp.finished,
                                    finish_reason=resp.finish_reason,
                                    sample_index=resp.sample_index)
                if resp.HasField("disaggregated"):
                    chunk.disagg = DisaggParams.from_pb(resp.disaggregated)
                if resp.HasField("usage"):
                    u = resp.usage
                    chunk.prompt_tokens = u.prompt_tokens
                    chunk.cached_tokens = u.cached_tokens
                    chunk.completion_tokens = u.completion_tokens
                yield chunk
        except grpc.aio.AioRpcError as e:
            code = e.code()
            raise EngineFailure(_GRPC_KIND.get(code, FailureKind.WORKER), worker.name,
                                f"{code.name}: {e.details()}", code) from None
        finally:
            stream.cancel()  # no-op when finished; frees the engine's slot when we stop early

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            with contextlib.suppress(Exception):
                await ch.close()


# --------------------------------------------------------------------------- OpenAI HTTP


class OpenAIBackend:
    """OpenAI-compatible completions servers (vLLM, SGLang) via kvrouter.backends.openai_http."""

    supports_disaggregation = False

    def __init__(self, read_timeout_s: float | None = 120.0) -> None:
        self.read_timeout_s = read_timeout_s

    async def generate(self, worker: WorkerInfo, model: str, call: EngineCall,
                       ) -> AsyncIterator[EngineChunk]:
        from kvrouter.backends import openai_http as oa

        if call.request_type is not RequestType.CONTEXT_AND_GENERATION:
            raise EngineFailure(FailureKind.UNSUPPORTED, worker.name,
                                "OpenAI-compatible workers serve aggregated requests only",
                                grpc.StatusCode.UNIMPLEMENTED)
        served = worker.metadata.get(SERVED_MODEL_METADATA_KEY) or model
        try:
            async for c in oa.generate(worker.address, served, call.token_ids.tolist(),
                                       call.max_tokens, request_id=call.request_id,
                                       read_timeout=self.read_timeout_s,
                                       **sampling_kwargs(call.sampling)):
                chunk = EngineChunk(token_ids=list(c.token_ids), finished=c.finished,
                                    finish_reason=c.finish_reason or "")
                if c.usage is not None:
                    chunk.prompt_tokens = c.usage.prompt_tokens
                    chunk.completion_tokens = c.usage.completion_tokens
                    chunk.cached_tokens = c.usage.cached_tokens or 0
                yield chunk
        except oa.BackendHTTPError as e:
            if 400 <= e.status < 500 and e.status not in (408, 429):
                raise EngineFailure(FailureKind.INVALID, worker.name, str(e),
                                    grpc.StatusCode.INVALID_ARGUMENT) from None
            raise EngineFailure(FailureKind.WORKER, worker.name, str(e)) from None
        except oa.BackendError as e:
            raise EngineFailure(FailureKind.WORKER, worker.name, str(e)) from None
        except ValueError as e:
            raise EngineFailure(FailureKind.INVALID, worker.name, str(e),
                                grpc.StatusCode.INVALID_ARGUMENT) from None

    async def close(self) -> None:
        return None


class Backends:
    """The backend of each worker, by its ``backend`` metadata (default ``grpc``)."""

    def __init__(self, backends: Mapping[str, Backend] | None = None,
                 max_message_bytes: int = 64 << 20) -> None:
        self.by_name: dict[str, Backend] = dict(backends) if backends is not None else {
            "grpc": GrpcEngineBackend(max_message_bytes), "openai": OpenAIBackend()}

    def for_worker(self, worker: WorkerInfo) -> Backend:
        name = worker.metadata.get(BACKEND_METADATA_KEY) or "grpc"
        b = self.by_name.get(name)
        if b is None:
            raise EngineFailure(FailureKind.UNSUPPORTED, worker.name,
                                f"unknown backend {name!r} in its metadata "
                                f"(known: {', '.join(sorted(self.by_name))})",
                                grpc.StatusCode.FAILED_PRECONDITION)
        return b

    def supports_disaggregation(self, worker: WorkerInfo) -> bool:
        name = worker.metadata.get(BACKEND_METADATA_KEY) or "grpc"
        b = self.by_name.get(name)
        return b is not None and b.supports_disaggregation

    async def close(self) -> None:
        for b in self.by_name.values():
            await b.close()
