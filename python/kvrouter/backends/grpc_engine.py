"""The kvrouter.v1.Engine gRPC service as a router backend (simulated engine, TensorRT-LLM
adapter). Supports disaggregated requests (context only / generation only)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.backends.base import (
    PHASE_TO_PB,
    DisaggParams,
    EngineCall,
    EngineChunk,
    EngineFailure,
    FailureKind,
)
from kvrouter.registry import WorkerInfo
from kvrouter.security.channels import aio_channel

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
    supports_n = True  # GenerateRequest.sampling.n: parallel samples after one prefill

    def __init__(self, max_message_bytes: int = 64 << 20) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        ch = self._channels.get(address)
        if ch is None:
            # TLS (mutual with a client certificate) from this process's KVROUTER_TLS_*.
            ch = aio_channel(address, self._options)
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
            session_id=call.session_id, tool_pause_s=call.tool_pause_s,
            tool_kv_action=call.tool_kv_action)
        if call.disagg is not None:
            req.disaggregated.CopyFrom(call.disagg.to_pb())
        req.disaggregated.request_type = PHASE_TO_PB[call.request_type]
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
                                    sample_index=resp.sample_index,
                                    logprobs=list(resp.logprobs) if resp.logprobs else [])
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
