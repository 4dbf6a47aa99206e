"""Shared fixtures: real `kvrouter serve` subprocesses on loopback (kvrouter.testing.processes)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from kvrouter.testing.processes import (
    RouterProcess,
    child_env,
    kvrouter_cmd,
    start_router,
    stop_process,
)
from kvrouter.testing.wait import wait_until

__all__ = ["REDIS_URL", "RouterProcess", "run_cli", "start_router", "stop_process"]

REDIS_URL = "redis://127.0.0.1:6379/0"
"""The Redis the test command starts (scripts/test.sh runs scripts/ensure_redis.sh)."""


@pytest.fixture(scope="session")
def redis_url() -> str:
    """REDIS_URL once it answers. A test that needs Redis fails without it, never skips:
    the test command always starts one, so a missing Redis is a broken run."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({exc}); the test command starts it "
                    "(scripts/ensure_redis.sh)", pytrace=False)
    return REDIS_URL


def _routers(base: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Factory of routers with work directories under `base`; all stopped at the end."""
    started: list[RouterProcess] = []

    def start(config: Mapping[str, Any] | None = None, args: tuple[str, ...] = (),
              metrics: bool = False, env: Mapping[str, str] | None = None) -> RouterProcess:
        rp = start_router(base / f"r{len(started)}", config, args, metrics=metrics, env=env)
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


@pytest.fixture
def router_server(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Factory: `router_server(config_dict, args=(...), metrics=False)`; all stopped at teardown."""
    yield from _routers(tmp_path)


@pytest.fixture(scope="module")
def module_router_server(tmp_path_factory: pytest.TempPathFactory,
                         ) -> Iterator[Callable[..., RouterProcess]]:
    """Like router_server, for servers shared by the tests of one module."""
    yield from _routers(tmp_path_factory.mktemp("router"))


class BlockStore:
    """Publishes KV 'stored' events for a worker over Router.PublishEvents, the way a
    worker process does: one batch per call, per-worker sequence numbers from 0."""

    def __init__(self) -> None:
        self._seq: dict[tuple[str, str], int] = {}
        self._next_hash = 1

    def __call__(self, client: Any, model: str, worker: str, tokens: list[int],
                 block_size: int, extra_key: bytes | None = None, tier: str = "gpu") -> None:
        from kvrouter.events.codec import encode_payload
        from kvrouter.events.model import BlockStored, Tier

        n = len(tokens) // block_size
        hashes = tuple(range(self._next_hash, self._next_hash + n))
        self._next_hash += n
        event = BlockStored(hashes=hashes, parent=None, token_ids=tuple(tokens[: n * block_size]),
                            block_size=block_size, tier=Tier.parse(tier), extra_key=extra_key)
        seq = self._seq.get((model, worker), 0)
        self._seq[(model, worker)] = seq + 1
        before = self._cached(client, model, worker)
        client.publish_events(model, worker, "test-epoch", seq, encode_payload([event]))
        # The event plane applies batches asynchronously: wait until this one landed.
        wait_until(lambda: self._cached(client, model, worker) >= before + n, 10, interval=0.01,
                   what=f"{n} blocks for {model}/{worker} applied")

    @staticmethod
    def _cached(client: Any, model: str, worker: str) -> int:
        return sum(w.cached_blocks for w in client.list_workers(model) if w.name == worker)


@pytest.fixture
def store_blocks() -> BlockStore:
    return BlockStore()


@pytest.fixture(scope="session")
def block_store_class() -> type[BlockStore]:
    """For module-scoped fixtures, which cannot use store_blocks."""
    return BlockStore


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvrouter_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=child_env())


@pytest.fixture
def kvrouter_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m kvrouter ARGS...` in a child process; returns CompletedProcess."""
    return run_cli
