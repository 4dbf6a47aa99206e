"""gRPC channels of kvrouter clients (the Router clients, engines' router link, the router's
engine backends): TLS from the process's TlsFiles and a bearer token.

    KVROUTER_TOKEN / KVROUTER_TOKEN_FILE   the bearer token sent as `authorization: Bearer`
    KVROUTER_TLS_*                        kvrouter.security.tls

A token travels only over TLS, or in plaintext to a loopback target (gRPC's local channel
credentials check that the peer is on this machine before sending call credentials).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvrouter.security.tls import TlsError, TlsFiles

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

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, or None for a plaintext channel without a token."""
        call = grpc.access_token_call_credentials(self.token) if self.token else None
        if self.tls is not None:
            creds = self.tls.channel_credentials()
            return creds if call is None else grpc.composite_channel_credentials(creds, call)
        if call is None:
            return None
        # Plaintext, but only to a local peer: call credentials are refused on a plain
        # insecure channel, and local credentials fail the call if the peer is remote.
        local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        return grpc.composite_channel_credentials(local, call)

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [*options, *(self.tls.channel_options() if self.tls else ())]

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=list(options))
        return grpc.secure_channel(target, creds, options=self._options(options))

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options))
        return grpc.aio.secure_channel(target, creds, options=self._options(options))


def sync_channel(target: str, options: Sequence[tuple[str, Any]] = (),
            security: ClientSecurity | None = None) -> grpc.Channel:
    """A blocking channel to `target` (security: the KVROUTER_TLS_* / KVROUTER_TOKEN* environment
    when not given)."""
    return (security or ClientSecurity.from_env()).channel(target, options)


def aio_channel(target: str, options: Sequence[tuple[str, Any]] = (),
                security: ClientSecurity | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `target` (security as in `channel`)."""
    return (security or ClientSecurity.from_env()).aio_channel(target, options)
