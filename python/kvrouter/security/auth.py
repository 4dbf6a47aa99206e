"""Authentication and roles on the router's gRPC listeners (docs/security.md).

Principals come from an auth file (YAML or JSON, `router.auth_file`):

    principals:
      - name: gateway                 # who it is (logs, metrics)
        roles: [client]               # client, worker, admin (several allowed)
        token_file: /run/secrets/kvrouter/gateway.token   # or token_env / token_sha256 / token
      - name: w0
        roles: [worker]
        token_env: KVROUTER_W0_TOKEN
        workers: [w0]                 # worker identities it speaks for (default: [name])
      - name: ops
        roles: [admin, client]
        cert_identity: ops.kvrouter   # a client certificate's CN or SAN (mutual TLS)

A caller authenticates with `authorization: Bearer <token>` or with its verified client
certificate. Each RPC needs a role (ROLE_OF): client (Route, RouteStream, Generate, Release,
MarkPrefillDone, Explain, List*), worker (RegisterWorker, Heartbeat, PublishEvents, and only
for a `worker` the principal speaks for), admin (DrainWorker, DeregisterWorker; a worker may
deregister itself). Health is open (probes); reflection needs any principal. With a
separate admin port, admin RPCs are served only there and nothing else is.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvrouter.security.metrics import SECURITY_METRICS

log = logging.getLogger("kvrouter.security")


class Role(StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    ADMIN = "admin"


class AuthError(ValueError):
    """The auth file is missing, does not parse or names a bad principal."""


_ROUTER = "/kvrouter.v1.Router/"
# Every Router RPC and the role it needs; a Router method missing here needs admin (deny by
# default: a new RPC is not open until someone decides who may call it).
ROLE_OF: dict[str, Role] = {
    **{_ROUTER + m: Role.CLIENT for m in (
        "Route", "RouteStream", "Generate", "Release", "MarkPrefillDone", "Explain",
        "ListWorkers", "ListModels")},
    **{_ROUTER + m: Role.WORKER for m in ("RegisterWorker", "Heartbeat", "PublishEvents")},
    **{_ROUTER + m: Role.ADMIN for m in ("DrainWorker", "DeregisterWorker")},
}
# Admin RPCs a worker may call for its own identity.
SELF_SERVICE = frozenset({_ROUTER + "DeregisterWorker"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ANY_PRINCIPAL_PREFIXES = ("/grpc.reflection.",)


def role_of(method: str) -> Role | None:
    """The role `method` needs; None: any authenticated principal (reflection, engines)."""
    role = ROLE_OF.get(method)
    if role is not None:
        return role
    if method.startswith(_ROUTER):
        return Role.ADMIN
    return None


class PrincipalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    roles: list[Role] = Field(min_length=1)
    token: str | None = Field(default=None, min_length=16,
                              description="the token itself (prefer token_file/token_env)")
    token_file: Path | None = None
    token_env: str | None = None
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$",
                                     description="hex SHA-256 of the token")
    cert_identity: str | None = Field(default=None, min_length=1,
                                      description="CN or SAN of its client certificate")
    workers: list[str] = Field(default_factory=list,
                               description="worker names it may register and publish for")

    @model_validator(mode="after")
    def _one_token_source(self) -> PrincipalConfig:
        sources = [s for s in ("token", "token_file", "token_env", "token_sha256")
                   if getattr(self, s) is not None]
        if len(sources) > 1:
            raise ValueError(f"principal {self.name!r}: give one of {', '.join(sources)}")
        if not sources and self.cert_identity is None:
            raise ValueError(f"principal {self.name!r} has no credential (a token or a "
                             "cert_identity)")
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principals: list[PrincipalConfig] = Field(min_length=1)


def token_digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[Role]
    workers: frozenset[str]

    def speaks_for(self, worker: str) -> bool:
        return worker in self.workers


def _token_of(p: PrincipalConfig, env: Mapping[str, str]) -> bytes | None:
    if p.token_sha256 is not None:
        return bytes.fromhex(p.token_sha256)
    token: str | None = p.token
    if p.token_file is not None:
        try:
            token = p.token_file.read_text().strip()
        except OSError as e:
            raise AuthError(f"principal {p.name!r}: cannot read token_file {p.token_file}: "
                            f"{e.strerror}") from None
    elif p.token_env is not None:
        token = env.get(p.token_env, "").strip()
        if not token:
            raise AuthError(f"principal {p.name!r}: environment variable {p.token_env} is "
                            "unset or empty")
    if token is None:
        return None
    if len(token) < 16:
        raise AuthError(f"principal {p.name!r}: token shorter than 16 characters")
    return token_digest(token)


class Authenticator:
    """Who a caller is, from its bearer token or its verified client certificate."""

    def __init__(self, config: AuthConfig, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._by_digest: dict[bytes, Principal] = {}
        self._by_cert: dict[str, Principal] = {}
        names: set[str] = set()
        for p in config.principals:
            if p.name in names:
                raise AuthError(f"duplicate principal name {p.name!r}")
            names.add(p.name)
            workers = p.workers or ([p.name] if Role.WORKER in p.roles else [])
            principal = Principal(p.name, frozenset(p.roles), frozenset(workers))
            digest = _token_of(p, env)
            if digest is not None:
                if digest in self._by_digest:
                    raise AuthError(f"principals {self._by_digest[digest].name!r} and "
                                    f"{p.name!r} share a token")
                self._by_digest[digest] = principal
            if p.cert_identity is not None:
                if p.cert_identity in self._by_cert:
                    raise AuthError(f"two principals claim cert_identity {p.cert_identity!r}")
                self._by_cert[p.cert_identity] = principal

    @classmethod
    def from_file(cls, path: str | os.PathLike[str],
                  env: Mapping[str, str] | None = None) -> Authenticator:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except OSError as e:
            raise AuthError(f"cannot read auth file {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise AuthError(f"auth file {p} does not parse: {e}") from None
        try:
            config = AuthConfig.model_validate(data)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                             for err in e.errors())
            raise AuthError(f"auth file {p}: {errs}") from None
        return cls(config, env)

    def by_token(self, token: str) -> Principal | None:
        digest = token_digest(token)
        found = self._by_digest.get(digest)
        # The dict lookup already matched the digest; compare_digest keeps the final
        # comparison constant-time all the same.
        if found is not None and hmac.compare_digest(digest, token_digest(token)):
            return found
        return None

    def by_cert(self, identities: Iterable[bytes]) -> Principal | None:
        for ident in identities:
            found = self._by_cert.get(ident.decode(errors="replace"))
            if found is not None:
                return found
        return None

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None,
                     peer_identities: Iterable[bytes] | None) -> Principal | None:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return self.by_token(token.strip())
                return None
        if peer_identities:
            return self.by_cert(peer_identities)
        return None


# ---------------------------------------------------------------------- the interceptor
@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Which roles' RPCs a listener serves (the admin port serves admin only, the main port
    everything else when there is an admin port) and who authenticates callers."""

    listener: str
    roles: frozenset[Role]
    authenticator: Authenticator | None = None


Check = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


async def _deny(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                reason: str, message: str) -> NoReturn:
    SECURITY_METRICS.denied(reason)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort() always raises


def _checker(policy: PortPolicy, method: str) -> Check | None:
    """The check a call of `method` goes through on this port; None: no check."""
    if method.startswith(OPEN_PREFIXES):
        return None
    role = role_of(method)
    auth = policy.authenticator
    # A worker may deregister itself (engines do on a clean shutdown) wherever worker RPCs
    # are served; deregistering another worker stays admin.
    self_service = method in SELF_SERVICE and auth is not None and Role.WORKER in policy.roles
    served = role is None or role in policy.roles or self_service
    if served and auth is None:
        return None
    short = method.rsplit("/", 1)[-1]

    async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not served:
            where = "the admin port" if role is Role.ADMIN else "the main port"
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, "wrong_port",
                        f"{short} is not served on the {policy.listener} port; use {where}")
        assert auth is not None
        principal = auth.authenticate(context.invocation_metadata(), context.peer_identities())
        if principal is None:
            await _deny(context, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                        f"{short} needs credentials: a bearer token or a client certificate "
                        "known to the router")
        if role is None or (role in principal.roles and role in policy.roles):
            acting = role
        elif self_service and Role.WORKER in principal.roles:
            acting = Role.WORKER
        elif role in principal.roles:  # an admin on the main port of a router with an admin port
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, "wrong_port",
                        f"{short} is served on the admin port")
        else:
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, "role",
                        f"{short} needs the {role.value} role; {principal.name!r} has "
                        f"{', '.join(sorted(r.value for r in principal.roles))}")
        if acting is Role.WORKER and request is not None:
            worker = getattr(request, "worker", None)
            if isinstance(worker, str) and not principal.speaks_for(worker):
                await _deny(context, grpc.StatusCode.PERMISSION_DENIED, "identity",
                            f"{principal.name!r} may not act for worker {worker[:64]!r}")

    return check


def _guarded(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` whose behaviour runs `check` first (with the request when there is one
    request message, else None before the stream is read). Async behaviours only, each
    wrapper of the same kind (coroutine or async generator) as the aio server expects."""
    kind = ("unary_unary" if not handler.request_streaming and not handler.response_streaming
            else "unary_stream" if not handler.request_streaming
            else "stream_unary" if not handler.response_streaming else "stream_stream")
    behaviour = getattr(handler, kind)
    is_gen = inspect.isasyncgenfunction(behaviour)
    if not (is_gen or inspect.iscoroutinefunction(behaviour)):
        return handler
    unary = not handler.request_streaming
    wrapped: Callable[..., Any]
    if is_gen:
        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            await check(request if unary else None, context)
            async for resp in behaviour(request, context):
                yield resp
        wrapped = gen
    else:
        async def coro(request: Any, context: Any) -> Any:
            await check(request if unary else None, context)
            return await behaviour(request, context)
        wrapped = coro
    return handler._replace(**{kind: wrapped})


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Enforces a PortPolicy on every call of a gRPC server."""

    def __init__(self, policy: PortPolicy) -> None:
        self.policy = policy
        # method -> (the handler grpc gave, the handler to run): wrapped once per method.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        check = _checker(self.policy, method)
        out = handler if check is None else _guarded(handler, check)
        self._handlers[method] = (handler, out)  # only registered methods reach here
        return out
