"""gRPC channels of kvrouter clients (the Router clients, engines' router link, the router's
engine backends): TLS from the process's TlsFiles and a bearer token.

    KVROUTER_TOKEN / KVROUTER_TOKEN_FILE   the bearer token sent as `authorization: Bearer`
    KVROUTER_TLS_*                        kvrouter.security.tls

A token travels only over TLS, or in plaintext to a loopback target (a channel to another
address without TLS is refused when it is made).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from kvrouter.security.tls import TlsError, TlsFiles, is_loopback

ENV_TOKEN = "KVROUTER_TOKEN"
ENV_TOKEN_FILE = "KVROUTER_TOKEN_FILE"


def read_token(path: str | os.PathLike[str]) -> str:
    """A token file's content without surrounding white space (a trailing newline)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise TlsError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise TlsError(f"token file {path} is empty")
    return token


def _with_token(details: Any, md: tuple[str, str], aio: bool) -> Any:
    metadata = list(details.metadata or ())
    metadata.append(md)
    if aio:
        return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                          grpc.aio.Metadata(*metadata),
                                          details.credentials, details.wait_for_ready)
    return _SyncDetails(details.method, details.timeout, metadata, details.credentials,
                        details.wait_for_ready, getattr(details, "compression", None))


class _SyncDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self.md = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.md, False), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.md, False), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_token(details, self.md, False), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_token(details, self.md, False), requests)


class _AioTokenBase:
    def __init__(self, token: str) -> None:
        self.md = ("authorization", f"Bearer {token}")


# grpc.aio files an interceptor under the first call kind it implements, so each kind has
# an object of its own.
class _AioTokenUU(_AioTokenBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.md, True), request)


class _AioTokenUS(_AioTokenBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.md, True), request)


class _AioTokenSU(_AioTokenBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.md, True), requests)


class _AioTokenSS(_AioTokenBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.md, True), requests)


def _aio_token(token: str) -> list[Any]:
    """Interceptors adding `authorization: Bearer` to every call of an asyncio channel."""
    return [k(token) for k in (_AioTokenUU, _AioTokenUS, _AioTokenSU, _AioTokenSS)]


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How a client reaches a kvrouter gRPC server: TLS (None: plaintext) and a token."""

    tls: TlsFiles | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSecurity:
        env = os.environ if env is None else env
        token = env.get(ENV_TOKEN, "").strip() or None
        if token is None and env.get(ENV_TOKEN_FILE, "").strip():
            token = read_token(env[ENV_TOKEN_FILE].strip())
        return cls(tls=TlsFiles.from_env(env), token=token)

    def _check_target(self, target: str) -> None:
        # The token is sent as call metadata by an interceptor (gRPC's call-credential
        # plugins cost a thread hop per call: about half the unary rate on loopback,
        # bench/security_overhead.py), so the TLS-or-local rule is checked here.
        if self.token and self.tls is None and not is_loopback(target):
            raise TlsError(f"a bearer token travels only over TLS or to a loopback address, "
                           f"not in plaintext to {target} (set KVROUTER_TLS_CA)")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials (TLS), or None for a plaintext channel."""
        return self.tls.channel_credentials() if self.tls is not None else None

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [*options, *(self.tls.channel_options() if self.tls else ())]

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        self._check_target(target)
        creds = self.credentials()
        ch = (grpc.insecure_channel(target, options=list(options)) if creds is None
              else grpc.secure_channel(target, creds, options=self._options(options)))
        return grpc.intercept_channel(ch, _SyncToken(self.token)) if self.token else ch

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        self._check_target(target)
        creds = self.credentials()
        interceptors = _aio_token(self.token) if self.token else None
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options),
                                             interceptors=interceptors)
        return grpc.aio.secure_channel(target, creds, options=self._options(options),
                                       interceptors=interceptors)


def sync_channel(target: str, options: Sequence[tuple[str, Any]] = (),
            security: ClientSecurity | None = None) -> grpc.Channel:
    """A blocking channel to `target` (security: the KVROUTER_TLS_* / KVROUTER_TOKEN* environment
    when not given)."""
    return (security or ClientSecurity.from_env()).channel(target, options)


def aio_channel(target: str, options: Sequence[tuple[str, Any]] = (),
                security: ClientSecurity | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `target` (security as in `channel`)."""
    return (security or ClientSecurity.from_env()).aio_channel(target, options)
