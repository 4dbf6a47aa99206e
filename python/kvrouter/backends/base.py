"""What the router hands an engine backend and gets back: one call, its stream of chunks,
and failures that say what the caller may do next. Every wire protocol implements
`Backend` (kvrouter.backends.grpc_engine, kvrouter.backends.openai_http);
kvrouter.backends.dispatch picks one per worker by its registry metadata.

Every failure becomes an `EngineFailure` whose `kind` tells the caller what it may do:
retry elsewhere (worker failed), re-prefill (the KV to import is gone), or give up
and tell the client (bad request, does not fit).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import grpc
import numpy as np

from kvrouter._proto.v1 import common_pb2
from kvrouter.registry import WorkerInfo


class RequestPhase(StrEnum):
    """Phase of a disaggregated request (TensorRT-LLM's DisaggregatedParams.request_type;
    on the wire: common_pb2.RequestType)."""

    CONTEXT_AND_GENERATION = "context_and_generation"
    CONTEXT_ONLY = "context_only"
    GENERATION_ONLY = "generation_only"


PHASE_TO_PB = {
    RequestPhase.CONTEXT_AND_GENERATION: common_pb2.REQUEST_TYPE_CONTEXT_AND_GENERATION,
    RequestPhase.CONTEXT_ONLY: common_pb2.REQUEST_TYPE_CONTEXT_ONLY,
    RequestPhase.GENERATION_ONLY: common_pb2.REQUEST_TYPE_GENERATION_ONLY,
}
_PHASE_FROM_PB = {v: k for k, v in PHASE_TO_PB.items()}
_PHASE_FROM_PB[common_pb2.REQUEST_TYPE_UNSPECIFIED] = RequestPhase.CONTEXT_AND_GENERATION


@dataclass(frozen=True, slots=True)
class DisaggParams:
    """What a context phase hands to the generation phase; the router passes it through."""

    request_type: RequestPhase
    first_gen_tokens: tuple[int, ...] = ()
    ctx_request_id: int = 0
    opaque_state: bytes = b""
    draft_tokens: tuple[int, ...] = ()
    ctx_worker_address: str = ""

    def to_pb(self) -> common_pb2.DisaggregatedParams:
        return common_pb2.DisaggregatedParams(
            request_type=PHASE_TO_PB[self.request_type], first_gen_tokens=self.first_gen_tokens,
            ctx_request_id=self.ctx_request_id, opaque_state=self.opaque_state,
            draft_tokens=self.draft_tokens, ctx_worker_address=self.ctx_worker_address)

    @classmethod
    def from_pb(cls, pb: common_pb2.DisaggregatedParams) -> DisaggParams:
        return cls(request_type=_PHASE_FROM_PB.get(pb.request_type,
                                                   RequestPhase.CONTEXT_AND_GENERATION),
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
    request_type: RequestPhase = RequestPhase.CONTEXT_AND_GENERATION
    disagg: DisaggParams | None = None  # the context phase's params, for generation only
    extra_key: bytes = b""
    lora_name: str = ""
    session_id: str = ""
    tool_pause_s: float = 0.0  # the session's tool pause after this turn (docs/kv-offload.md)
    tool_kv_action: str = ""


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
    logprobs: list[float] = field(default_factory=list)  # per token, when the engine sends them


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
    """One wire protocol to engines. `generate` streams one call's chunks; stopping the
    iteration early (or cancelling it) must abort the request on the engine."""

    supports_disaggregation: bool

    def generate(self, worker: WorkerInfo, model: str, call: EngineCall,
                 ) -> AsyncIterator[EngineChunk]: ...

    async def close(self) -> None: ...
