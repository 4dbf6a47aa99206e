"""The gRPC listener the router and the engines share: one grpc.aio server with standard
health (grpc.health.v1) and reflection for the services it carries, one listen-error rule,
and a stop that reports NOT_SERVING before the server goes away."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvrouter._proto.v1 import engine_pb2
from kvrouter.security.tls import TlsFiles, secure_port

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ENGINE_SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name


class ListenError(RuntimeError):
    """The listen address cannot be bound (bad address, port in use)."""


class _Undecodable:
    """Stands in for a request message whose bytes could not be parsed."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(f"{type(e).__name__}: {e}"[:200])
    return parse


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], method: str,
                  bad: _Undecodable) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request to {method} cannot be decoded ({bad.error})")
    raise AssertionError("unreachable")  # pragma: no cover - abort() always raises



def _drop_locals(exc: BaseException) -> None:
    """Clear the locals of the finished frames an RPC's exception chain holds.

    A refused RPC ends in grpc.aio's AbortError, which sits in a reference cycle with
    the call's state, so the frames in its traceback (with the request and, for a
    prompt, its token array) live until the cyclic GC's next full pass: 2M-token
    prompts refused in a row grew a router by ~25 MiB each (bench/chaos). Cleared
    here, the cycle holds only small objects."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__

def _decode_checked(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that cannot raise and a behaviour that answers
    INVALID_ARGUMENT for an undecodable request. grpc's server turns a deserializer
    exception into UNKNOWN before any handler runs, so the check has to live here.

    Only async behaviours are wrapped: the aio server dispatches on whether a behaviour is a
    coroutine or an async generator function, and each wrapper keeps that kind."""
    kind = ("unary_unary" if not handler.request_streaming and not handler.response_streaming
            else "unary_stream" if not handler.request_streaming
            else "stream_unary" if not handler.response_streaming else "stream_stream")
    behaviour = getattr(handler, kind)
    is_gen = inspect.isasyncgenfunction(behaviour)
    if not (is_gen or inspect.iscoroutinefunction(behaviour)):
        return handler
    wrapped: Callable[..., Any]
    if not handler.request_streaming:
        if is_gen:
            async def unary_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                try:
                    async for resp in behaviour(request, context):
                        yield resp
                except BaseException as exc:
                    request = None  # see _drop_locals
                    _drop_locals(exc)
                    raise
            wrapped = unary_gen
        else:
            async def unary_coro(request: Any, context: Any) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    request = None  # see _drop_locals
                    _drop_locals(exc)
                    raise
            wrapped = unary_coro
    else:
        def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async def gen() -> AsyncIterator[Any]:
                async for req in requests:
                    if isinstance(req, _Undecodable):
                        await _refuse(context, method, req)
                    yield req
            return gen()
        if is_gen:
            async def stream_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for resp in behaviour(checked(requests, context), context):
                    yield resp
            wrapped = stream_gen
        else:
            async def stream_coro(requests: Any, context: Any) -> Any:
                return await behaviour(checked(requests, context), context)
            wrapped = stream_coro
    return handler._replace(
        request_deserializer=_lenient(handler.request_deserializer), **{kind: wrapped})


class _DecodeErrors(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # method -> (handler, wrapped): the service's handler object is the same on every
        # call, so it is wrapped once instead of per RPC (~several us of closures/inspect).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _decode_checked(handler, method)
        if len(self._wrapped) < 1024:  # method names are the services' own, but stay bounded
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class GrpcServer:
    """A bound, not yet started server for `services` (full names, e.g. kvrouter.v1.Engine).

    Add the servicers to `.server`, then `start()`; `set_serving()` once the process can
    answer (health reports SERVING for "" and each of `services`); `stop()` at the end."""

    def __init__(self, listen: str, services: Sequence[str], *,
                 options: Sequence[tuple[str, Any]] = (), reflect: bool = True,
                 tls: TlsFiles | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        """`tls`: serve TLS (mutual with tls.client_auth); `interceptors` run before the
        decode check (kvrouter.security.auth.AccessInterceptor: callers are authenticated
        before their request is looked at)."""
        self.services = list(services)
        # Fail loudly if the port is taken instead of silently sharing it.
        # Undecodable requests (garbage bytes, invalid UTF-8) answer INVALID_ARGUMENT.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *options],
                                      interceptors=[*interceptors, _DecodeErrors()])
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflect:
            reflection.enable_server_reflection(
                [*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        try:
            self.port = secure_port(self.server, listen, tls)
        except (RuntimeError, ValueError) as e:  # ValueError: TlsError (unreadable files)
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
