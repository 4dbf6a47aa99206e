"""The backend of each worker, picked by its registry metadata ``backend``:

* ``grpc`` (default): kvrouter.backends.grpc_engine (the kvrouter.v1.Engine service);
* ``openai``: kvrouter.backends.openai_http (an OpenAI-compatible completions server:
  vLLM, SGLang); ``served_model`` names the model on that server when it differs from
  the router's model name. Aggregated requests only.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from kvrouter.backends.base import Backend, EngineFailure, FailureKind
from kvrouter.backends.grpc_engine import GrpcEngineBackend
from kvrouter.backends.openai_http import OpenAIBackend
from kvrouter.protocol import BACKEND_METADATA_KEY
from kvrouter.registry import WorkerInfo

DEFAULT_BACKEND = "grpc"


class Backends:
    """The backend of each worker, by its ``backend`` metadata (default ``grpc``)."""

    def __init__(self, backends: Mapping[str, Backend] | None = None,
                 max_message_bytes: int = 64 << 20) -> None:
        self.by_name: dict[str, Backend] = dict(backends) if backends is not None else {
            "grpc": GrpcEngineBackend(max_message_bytes), "openai": OpenAIBackend()}

    @staticmethod
    def _name(worker: WorkerInfo) -> str:
        return worker.metadata.get(BACKEND_METADATA_KEY) or DEFAULT_BACKEND

    def for_worker(self, worker: WorkerInfo) -> Backend:
        name = self._name(worker)
        b = self.by_name.get(name)
        if b is None:
            raise EngineFailure(FailureKind.UNSUPPORTED, worker.name,
                                f"unknown backend {name!r} in its metadata "
                                f"(known: {', '.join(sorted(self.by_name))})",
                                grpc.StatusCode.FAILED_PRECONDITION)
        return b

    def supports_disaggregation(self, worker: WorkerInfo) -> bool:
        b = self.by_name.get(self._name(worker))
        return b is not None and b.supports_disaggregation

    async def close(self) -> None:
        for b in self.by_name.values():
            await b.close()
