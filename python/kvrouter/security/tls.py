"""TLS for every kvrouter listener and channel, from one set of files per process.

A process has one identity: its certificate and key (`KVROUTER_TLS_CERT`,
`KVROUTER_TLS_KEY`), served when it listens and presented when it calls with mutual TLS,
and one CA bundle (`KVROUTER_TLS_CA`) that verifies its peers: the servers it calls and,
with `KVROUTER_TLS_CLIENT_AUTH=1`, the clients that call it (mutual TLS). The router reads
the same settings from its configuration (`router.tls_cert` ... whose environment names are
these very variables, kvrouter.config). `KVROUTER_TLS_SERVER_NAME` overrides the host name a
client checks the server's certificate against (a certificate issued for a service name,
dialled by IP).

gRPC credentials, an `ssl.SSLContext` (the HTTP front, httpx clients) and the arguments of
prometheus_client's `start_http_server` (/metrics) all come from `TlsFiles`, so the rules
(client certificate required or not, which CA) are written once.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_CERT = "KVROUTER_TLS_CERT"
ENV_KEY = "KVROUTER_TLS_KEY"
ENV_CA = "KVROUTER_TLS_CA"
ENV_CLIENT_AUTH = "KVROUTER_TLS_CLIENT_AUTH"
ENV_SERVER_NAME = "KVROUTER_TLS_SERVER_NAME"

_TRUE = frozenset({"1", "true", "yes", "on"})


class TlsError(ValueError):
    """TLS files missing, unreadable or inconsistent (the message names the file)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read TLS {what} {path}: {e.strerror}") from None


def host_of(listen: str) -> str:
    """The host part of `host:port` (IPv6 brackets removed)."""
    return listen.rpartition(":")[0].strip("[]")


def is_loopback(listen: str) -> bool:
    """Whether `listen` (host:port, or a unix: address) is reachable only from this machine.
    0.0.0.0, [::] and host names other than localhost count as reachable from outside."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = host_of(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """One process's TLS identity and trust. `cert`/`key`: its certificate; `ca`: the CA
    bundle that verifies peers (None: the system roots, for a client); `client_auth`:
    listeners require a client certificate signed by `ca` (mutual TLS)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_auth: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsError("a TLS certificate and its key go together (set both or neither)")
        if self.client_auth and (self.ca is None or self.cert is None):
            raise TlsError("client certificate authentication (mutual TLS) needs the server's "
                           "certificate and key and the CA that signs client certificates")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsFiles | None:
        """The KVROUTER_TLS_* settings, or None when none is set (plaintext)."""
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            v = env.get(name, "").strip()
            return Path(v) if v else None

        cert, key, ca = path(ENV_CERT), path(ENV_KEY), path(ENV_CA)
        client_auth = env.get(ENV_CLIENT_AUTH, "").strip().lower() in _TRUE
        name = env.get(ENV_SERVER_NAME, "").strip() or None
        if cert is None and key is None and ca is None:
            return None
        return cls(cert=cert, key=key, ca=ca, client_auth=client_auth, server_name=name)

    @property
    def can_serve(self) -> bool:
        return self.cert is not None

    # ------------------------------------------------------------------ gRPC
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of a gRPC listener. With a CA, client certificates are verified when
        presented (their identity can authenticate a caller) and required with client_auth."""
        if self.cert is None or self.key is None:
            raise TlsError("a TLS listener needs a certificate and key (KVROUTER_TLS_CERT, "
                           "KVROUTER_TLS_KEY or router.tls_cert / router.tls_key)")
        pair = (_read(self.key, "key"), _read(self.cert, "certificate"))
        roots = _read(self.ca, "CA bundle") if self.ca is not None else None
        return grpc.ssl_server_credentials([pair], root_certificates=roots,
                                           require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a gRPC client: verify the server with `ca` (system roots when
        None) and present this process's certificate when it has one (mutual TLS)."""
        roots = _read(self.ca, "CA bundle") if self.ca is not None else None
        key = _read(self.key, "key") if self.key is not None else None
        chain = _read(self.cert, "certificate") if self.cert is not None else None
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key,
                                            certificate_chain=chain)

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name),
                    ("grpc.default_authority", self.server_name)]
        return []

    # ------------------------------------------------------------------ ssl / HTTP
    def server_ssl_context(self, *, client_auth: bool | None = None) -> ssl.SSLContext:
        """An ssl.SSLContext for an HTTP listener (the HTTP front, /metrics), TLS 1.2+.
        `client_auth` overrides whether a client certificate is required."""
        if self.cert is None or self.key is None:
            raise TlsError("a TLS listener needs a certificate and key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca is not None:
                ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"cannot load TLS files ({self.cert}, {self.key}, {self.ca}): {e}"
                           ) from None
        required = self.client_auth if client_auth is None else client_auth
        if required:
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif self.ca is not None:
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """An ssl.SSLContext for an HTTP client (httpx `verify=`): verify the server with
        `ca` (system roots when None), present this process's certificate when it has one."""
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise TlsError(f"cannot load TLS certificate {self.cert}: {e}") from None
        return ctx

    def prometheus_kwargs(self, *, client_auth: bool = False) -> dict[str, Any]:
        """Keyword arguments of prometheus_client.start_http_server for /metrics over TLS
        (a client certificate is required only with `client_auth`: scrapers often have none)."""
        if self.cert is None or self.key is None:
            raise TlsError("a TLS listener needs a certificate and key")
        out: dict[str, Any] = {"certfile": str(self.cert), "keyfile": str(self.key)}
        if client_auth:
            if self.ca is None:
                raise TlsError("client certificates on /metrics need a CA bundle")
            out.update(client_cafile=str(self.ca), client_auth_required=True)
        return out


def secure_port(server: grpc.aio.Server, listen: str, tls: TlsFiles | None) -> int:
    """Bind `listen` on `server`, with TLS when `tls` can serve. The bound port (0: failed)."""
    if tls is not None and tls.can_serve:
        return server.add_secure_port(listen, tls.server_credentials())
    return server.add_insecure_port(listen)
