"""The router's security, built once from its configuration (kvrouter.config.RouterConfig):
TLS of its listeners, the access policy of its main and admin ports, /metrics over TLS."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from kvrouter.security import metrics as security_metrics
from kvrouter.security.auth import AccessInterceptor, Authenticator, AuthError, PortPolicy, Role
from kvrouter.security.listeners import RouterSecuritySettings, announce_insecure, router_tls
from kvrouter.security.metrics import SECURITY_METRICS
from kvrouter.security.tls import TlsError, TlsFiles, is_loopback

log = logging.getLogger("kvrouter.security")
ENV_AUTH_FILE = "KVROUTER_AUTH_FILE"

ALL_ROLES = frozenset(Role)
COLLECTORS = security_metrics.ALL


@dataclass(frozen=True, slots=True)
class RouterSecurity:
    tls: TlsFiles | None
    authenticator: Authenticator | None
    separate_admin: bool
    metrics_tls: bool

    @classmethod
    def from_config(cls, r: RouterSecuritySettings, *, metrics_tls: bool = True) -> RouterSecurity:
        """Raises RuntimeError naming the bad file (auth file, certificates)."""
        try:
            tls = router_tls(r)
            auth = Authenticator.from_file(r.auth_file) if r.auth_file is not None else None
        except (AuthError, TlsError) as e:
            raise RuntimeError(str(e)) from None
        announce_insecure(r)
        return cls(tls=tls if tls is not None and tls.can_serve else None, authenticator=auth,
                   separate_admin=r.admin_listen is not None, metrics_tls=metrics_tls)

    def interceptors(self, listener: Literal["main", "admin"]) -> list[grpc.aio.ServerInterceptor]:
        if listener == "admin":
            roles = frozenset({Role.ADMIN})
        else:
            roles = ALL_ROLES - {Role.ADMIN} if self.separate_admin else ALL_ROLES
        if self.authenticator is None and roles == ALL_ROLES:
            return []  # nothing to enforce: no interceptor on the hot path
        return [AccessInterceptor(PortPolicy(listener, roles, self.authenticator))]

    def metrics_kwargs(self) -> dict[str, Any]:
        """prometheus_client.start_http_server's TLS arguments (empty: plain HTTP)."""
        if self.tls is None or not self.metrics_tls:
            return {}
        return self.tls.prometheus_kwargs()


@dataclass(frozen=True, slots=True)
class EngineSecurity:
    """An engine's Engine listener: TLS from KVROUTER_TLS_* and, with KVROUTER_AUTH_FILE,
    the router's principals (any principal may call the Engine service: the router's
    engine channels send the router process's KVROUTER_TOKEN*)."""

    tls: TlsFiles | None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]

    @classmethod
    def from_env(cls, listen: str, env: Mapping[str, str] | None = None) -> EngineSecurity:
        """Raises RuntimeError naming a bad file. A listener reachable from other machines
        without TLS and authentication is allowed (engines sit on private networks) but
        logged and exported like the router's --insecure."""
        env = os.environ if env is None else env
        try:
            tls = TlsFiles.from_env(env)
            path = env.get(ENV_AUTH_FILE, "").strip()
            auth = Authenticator.from_file(path, env) if path else None
        except (AuthError, TlsError) as e:
            raise RuntimeError(str(e)) from None
        serving_tls = tls if tls is not None and tls.can_serve else None
        authenticated = auth is not None or (serving_tls is not None and serving_tls.client_auth)
        if not is_loopback(listen) and (serving_tls is None or not authenticated):
            log.warning("INSECURE: engine listener reachable from other machines without %s",
                        "TLS" if serving_tls is None else "authentication",
                        extra={"listener": "engine", "address": listen})
            SECURITY_METRICS.insecure("engine")
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        if auth is not None:
            interceptors = (AccessInterceptor(PortPolicy("engine", ALL_ROLES, auth)),)
        return cls(tls=serving_tls, interceptors=interceptors)
