"""Secure defaults for listen addresses: a listener reachable from other machines needs TLS
and authentication, unless the operator says `--insecure` (router.insecure), which is then
logged at WARNING and exported as kvrouter_insecure_listener{listener} = 1."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from kvrouter.security.metrics import SECURITY_METRICS
from kvrouter.security.tls import TlsFiles, is_loopback

log = logging.getLogger("kvrouter.security")


class RouterSecuritySettings(Protocol):
    """The security fields of kvrouter.config.RouterConfig."""

    listen: str
    admin_listen: str | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None
    tls_client_auth: bool
    auth_file: Path | None
    insecure: bool


def router_tls(r: RouterSecuritySettings) -> TlsFiles | None:
    """The router's TlsFiles (None: plaintext); raises TlsError for an inconsistent set."""
    if r.tls_cert is None and r.tls_key is None and r.tls_ca is None and not r.tls_client_auth:
        return None
    return TlsFiles(cert=r.tls_cert, key=r.tls_key, ca=r.tls_ca, client_auth=r.tls_client_auth)


def exposed_listeners(r: RouterSecuritySettings) -> list[tuple[str, str]]:
    """(name, address) of the gRPC listeners reachable from other machines."""
    out = [("grpc", r.listen)]
    if r.admin_listen:
        out.append(("admin", r.admin_listen))
    http = getattr(r, "http", None)  # the HTTP front (kvrouter.http), when configured
    if http:
        out.append(("http", http))
    return [(name, addr) for name, addr in out if not is_loopback(addr)]


def check_router(r: RouterSecuritySettings) -> None:
    """Refuse (ValueError) a configuration whose gRPC listener is reachable from other
    machines without TLS and authentication, unless `insecure` is set."""
    tls = router_tls(r)
    secured = tls is not None and tls.can_serve and (r.auth_file is not None or tls.client_auth)
    if secured or r.insecure:
        return
    exposed = exposed_listeners(r)
    if exposed:
        where = ", ".join(f"{name} {addr}" for name, addr in exposed)
        raise ValueError(
            f"{where} is reachable from other machines, but the router has "
            f"{'no TLS' if tls is None or not tls.can_serve else 'TLS'}"
            f"{' and' if tls is None or not tls.can_serve else ' but'} no authentication "
            "(tls_cert/tls_key, and auth_file or tls_client_auth); listen on 127.0.0.1, "
            "configure them, or pass --insecure (router.insecure) to run exposed anyway")


def announce_insecure(r: RouterSecuritySettings) -> list[str]:
    """Log and export each exposed listener that runs without TLS or authentication
    (allowed by `insecure`); returns their names."""
    tls = router_tls(r)
    has_tls = tls is not None and tls.can_serve
    has_auth = r.auth_file is not None or (tls is not None and tls.client_auth)
    if has_tls and has_auth:
        return []
    names = []
    for name, addr in exposed_listeners(r):
        missing = " and ".join(w for w, ok in (("TLS", has_tls), ("authentication", has_auth))
                               if not ok)
        log.warning("INSECURE: listener reachable from other machines without %s "
                    "(--insecure): anyone who can connect can register workers, publish "
                    "events and drain workers", missing,
                    extra={"listener": name, "address": addr})
        SECURITY_METRICS.insecure(name)
        names.append(name)
    return names
