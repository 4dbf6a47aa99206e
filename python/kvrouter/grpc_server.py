"""The gRPC listener the router and the engines share: one grpc.aio server with standard
health (grpc.health.v1) and reflection for the services it carries, one listen-error rule,
and a stop that reports NOT_SERVING before the server goes away."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvrouter._proto.v1 import engine_pb2

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ENGINE_SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


class ListenError(RuntimeError):
    """The listen address cannot be bound (bad address, port in use)."""


class GrpcServer:
    """A bound, not yet started server for `services` (full names, e.g. kvrouter.v1.Engine).

    Add the servicers to `.server`, then `start()`; `set_serving()` once the process can
    answer (health reports SERVING for "" and each of `services`); `stop()` at the end."""

    def __init__(self, listen: str, services: Sequence[str], *,
                 options: Sequence[tuple[str, Any]] = (), reflect: bool = True) -> None:
        self.services = list(services)
        # Fail loudly if the port is taken instead of silently sharing it.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *options])
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflect:
            reflection.enable_server_reflection(
                [*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        try:
            self.port = self.server.add_insecure_port(listen)
        except RuntimeError as e:
            raise ListenError(f"cannot listen on {listen}: {e}") from None
        if self.port == 0:
            raise ListenError(f"cannot listen on {listen} (address in use?)")

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self) -> None:
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def unimplemented(context: grpc.aio.ServicerContext[Any, Any], why: str) -> NoReturn:
    """End an RPC this server does not support with UNIMPLEMENTED and the reason."""
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)
    raise AssertionError("unreachable")  # pragma: no cover - abort() always raises
