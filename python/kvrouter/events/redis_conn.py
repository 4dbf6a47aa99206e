"""Redis clients for the event plane, built from one config (docs/event-plane.md).

Supported: redis:// and rediss:// (TLS) URLs, ACL user and password, TLS CA /
client certificate files, Sentinel (`redis+sentinel://h1:26379,h2:26379/service`
or `sentinels=` + `sentinel_service=`) and Cluster (`redis+cluster://host:port`
or `cluster=True`). Clients return bytes (decode_responses=False): payloads are binary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

RedisClient = aioredis.Redis | RedisCluster

_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: str | None = None
    tls: bool | None = None
    """None: from the URL scheme (rediss:// means TLS)."""
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    tls_check_hostname: bool = True
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    sentinel_service: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    cluster: bool = False
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    retries: int = 1
    """Retries inside redis-py per command; the event plane has its own reconnect loops,
    so this stays low to notice an outage quickly."""
    max_connections: int | None = None
    client_name: str | None = None

    @classmethod
    def from_options(cls, url: str, **opts: Any) -> RedisConfig:
        """Config from a URL plus keyword options named like the fields; unknown
        options are a clear error rather than silently ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(f"unknown Redis option(s): {', '.join(unknown)}")
        cfg = cls(url=url, **opts)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        scheme = urlsplit(self.url).scheme
        allowed = ("redis", "rediss", "unix", *_SENTINEL_SCHEMES, *_CLUSTER_SCHEMES)
        if scheme not in allowed:
            raise ValueError(f"Redis URL scheme {scheme!r} not supported (expected one of {allowed})")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.sentinels and not self.sentinel_service:
            raise ValueError("sentinels given without sentinel_service")
        if self.cluster and (self.sentinels or scheme in _SENTINEL_SCHEMES):
            raise ValueError("choose Sentinel or Cluster, not both")

    @property
    def is_cluster(self) -> bool:
        return self.cluster or urlsplit(self.url).scheme in _CLUSTER_SCHEMES

    @property
    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return urlsplit(self.url).scheme.startswith("rediss")

    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RedisConfig)) - {"url"}
"""Keyword options that configure a Redis connection (beside the URL)."""


def _common_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "decode_responses": False,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), cfg.retries),
    }
    if cfg.username is not None:
        kw["username"] = cfg.username
    if cfg.password is not None:
        kw["password"] = cfg.password
    if cfg.client_name:
        kw["client_name"] = cfg.client_name
    if cfg.max_connections:
        kw["max_connections"] = cfg.max_connections
    if cfg.use_tls:
        kw["ssl"] = True
        kw["ssl_cert_reqs"] = "required" if cfg.tls_verify else "none"
        kw["ssl_check_hostname"] = cfg.tls_check_hostname and cfg.tls_verify
        if cfg.tls_ca_file:
            kw["ssl_ca_certs"] = cfg.tls_ca_file
        if cfg.tls_cert_file:
            kw["ssl_certfile"] = cfg.tls_cert_file
            kw["ssl_keyfile"] = cfg.tls_key_file
    return kw


def _sentinel_from_url(cfg: RedisConfig) -> tuple[list[tuple[str, int]], str, int]:
    """redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db]"""
    parts = urlsplit(cfg.url)
    hosts_part = parts.netloc.rsplit("@", 1)[-1]
    hosts: list[tuple[str, int]] = []
    for item in hosts_part.split(","):
        host, _, port = item.partition(":")
        hosts.append((host, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("Sentinel URL needs the service name as its path: redis+sentinel://h:p/service")
    db = int(path[1]) if len(path) > 1 else 0
    if parts.username and cfg.username is None:
        cfg.username = unquote(parts.username)
    if parts.password and cfg.password is None:
        cfg.password = unquote(parts.password)
    return hosts, path[0], db


def make_client(cfg: RedisConfig) -> RedisClient:
    """A redis.asyncio client (Redis or RedisCluster) for the config."""
    cfg.validate()
    scheme = urlsplit(cfg.url).scheme
    if scheme in _SENTINEL_SCHEMES or cfg.sentinels:
        if scheme in _SENTINEL_SCHEMES:
            hosts, service, db = _sentinel_from_url(cfg)
        else:
            assert cfg.sentinel_service is not None
            hosts, service, db = cfg.sentinels, cfg.sentinel_service, 0
        kw = _common_kwargs(cfg)
        sentinel_kw: dict[str, Any] = {}
        if cfg.sentinel_username is not None:
            sentinel_kw["username"] = cfg.sentinel_username
        if cfg.sentinel_password is not None:
            sentinel_kw["password"] = cfg.sentinel_password
        if cfg.use_tls:
            sentinel_kw.update({k: v for k, v in kw.items() if k.startswith("ssl")})
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kw, **kw)
        return sentinel.master_for(service, db=db)
    if cfg.is_cluster:
        url = cfg.url
        if scheme in _CLUSTER_SCHEMES:
            url = url.replace(scheme, "rediss" if scheme.startswith("rediss") else "redis", 1)
        kw = _common_kwargs(cfg)
        kw.pop("retry", None)  # RedisCluster has its own retry on MOVED / failover
        kw.pop("max_connections", None)
        return RedisCluster.from_url(url, **kw)
    # from_url picks the TLS connection class from the scheme and hands the keywords to
    # it, which takes no `ssl` flag: say TLS through the scheme instead.
    kw = _common_kwargs(cfg)
    url = cfg.url
    if kw.pop("ssl", False) and scheme == "redis":
        url = "rediss" + url[len("redis"):]
    return aioredis.Redis.from_url(url, **kw)


def raw_stream_client(cfg: RedisConfig) -> RedisClient:
    """A client whose XREAD / XRANGE replies are left raw (no per-entry dicts): the
    ingest parses the flat field lists itself, which is faster on the hot path."""
    client = make_client(cfg)
    for cmd in ("XREAD", "XRANGE"):
        client.set_response_callback(cmd, _identity)
    return client


def _identity(response: Any, **_: Any) -> Any:
    return response


async def delete_namespace(client: RedisClient, namespace: str, batch: int = 500) -> int:
    """Delete every key of a namespace (tests, decommissioning). Returns keys deleted."""
    deleted = 0
    keys: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        keys.append(key)
        if len(keys) >= batch:
            deleted += await _delete_each(client, keys)
            keys = []
    if keys:
        deleted += await _delete_each(client, keys)
    return deleted


async def _delete_each(client: RedisClient, keys: list[bytes]) -> int:
    # One DEL per key in a pipeline: keys of a namespace span cluster slots.
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.delete(k)
    return sum(int(x) for x in await pipe.execute())
