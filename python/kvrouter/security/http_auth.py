"""Authentication on HTTP listeners (the OpenAI-compatible front, kvrouter.http): an aiohttp
middleware with the gRPC ports' rule (kvrouter.security.auth): a bearer token or a verified
client certificate of a principal with the client role; health and readiness stay open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from kvrouter.security.auth import Authenticator, Role
from kvrouter.security.metrics import SECURITY_METRICS

OPEN_PATHS = frozenset({"/health", "/ready"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _cert_identities(request: web.Request) -> list[bytes]:
    """CN and DNS/IP SANs of the client's verified certificate (mutual TLS), if any."""
    transport = request.transport
    cert: Any = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return []
    out = [value.encode() for kind, value in cert.get("subjectAltName", ())
           if kind in ("DNS", "IP Address")]
    for rdn in cert.get("subject", ()):
        out += [value.encode() for key, value in rdn if key == "commonName"]
    return out


def bearer_middleware(auth: Authenticator, deny: Callable[[int, str], Exception],
                      open_paths: Iterable[str] = OPEN_PATHS) -> Any:
    """The middleware; `deny(status, message)` builds the exception the front turns into
    its error response (401 without known credentials, 403 without the client role)."""
    open_set = frozenset(open_paths)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_set:
            return await handler(request)
        header = request.headers.get("Authorization")
        principal = auth.authenticate([("authorization", header)] if header else None,
                                      _cert_identities(request))
        if principal is None:
            SECURITY_METRICS.denied("unauthenticated")
            raise deny(401, "this endpoint needs credentials: a bearer token or a client "
                            "certificate known to the router")
        if Role.CLIENT not in principal.roles:
            SECURITY_METRICS.denied("role")
            raise deny(403, f"{principal.name!r} does not have the client role")
        return await handler(request)

    return authenticate
