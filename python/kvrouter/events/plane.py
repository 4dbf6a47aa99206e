"""The event plane: how a router learns what every worker caches and how loaded it is.

`make_event_plane(registry, redis_url, **opts)` returns
- `InProcessPlane` (kvrouter.events.inprocess) when redis_url is None: the
  embedded default for one process (demo, simulator, pure-logic tests).
  Publishers in the same process and the gRPC PublishEvents RPC (through
  `submit`) deliver straight into it.
- `RedisPlane` (kvrouter.events.redis_plane) otherwise: XREAD ingest of every
  shard stream, heartbeat liveness, gap repair (stream re-read or full dump),
  periodic snapshots with stream trimming, and reservations shared with the
  other router replicas.
Both implement `EventPlane` (kvrouter.events.plane_base). See
docs/event-plane.md for the protocol and the consistency model.
"""

from __future__ import annotations

from typing import Any

from kvrouter.events.inprocess import InProcessPlane
from kvrouter.events.plane_base import EventPlane, PlaneOptions
from kvrouter.events.redis_conn import OPTION_NAMES as REDIS_OPTION_NAMES
from kvrouter.events.redis_conn import RedisConfig
from kvrouter.events.redis_plane import RedisPlane
from kvrouter.registry import Registry

__all__ = ["EventPlane", "PlaneOptions", "make_event_plane"]

_PLANE_OPTION_NAMES = set(PlaneOptions.model_fields)


def make_event_plane(registry: Registry, redis_url: str | None, **opts: Any) -> EventPlane:
    """The in-process plane (redis_url None) or the Redis plane.

    Keyword options are PlaneOptions fields (namespace, replica_id, num_shards,
    heartbeat_ttl_s, snapshot_interval_s, ...) and, with a URL, RedisConfig fields
    (username, password, tls_ca_file, sentinels, cluster, ...); `redis_config=`
    passes a whole RedisConfig. Unknown or invalid options raise ValueError (a
    kvrouter.config.ConfigError that names each bad option).
    """
    redis_config = opts.pop("redis_config", None)
    unknown = sorted(set(opts) - REDIS_OPTION_NAMES - _PLANE_OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown event plane option(s): {', '.join(unknown)}")
    plane_opts = PlaneOptions.from_values({k: v for k, v in opts.items() if k in _PLANE_OPTION_NAMES},
                                          source="event plane options", what="event plane options")
    redis_opts = {k: v for k, v in opts.items() if k in REDIS_OPTION_NAMES}
    if redis_url is None and redis_config is None:
        if redis_opts:
            raise ValueError(f"Redis option(s) given without a Redis URL: {', '.join(sorted(redis_opts))}")
        return InProcessPlane(registry, plane_opts)
    if redis_config is None:
        assert redis_url is not None
        redis_config = RedisConfig.from_options(redis_url, **redis_opts)
    return RedisPlane(registry, redis_config, plane_opts)
