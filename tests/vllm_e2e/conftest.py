"""Fixtures for the end-to-end tests against real vLLM CPU servers (kvrouter.testing.vllm_harness).

One fleet per session: a private redis-server, `kvrouter serve` (router block size
16), two vLLM CPU servers (engine block size 32, 12-block caches so evictions
happen) each with a `kvrouter bridge vllm`. Starting it takes about a minute (plus a
few minutes the first time, to install .venv-vllm).

Where real vLLM cannot run (no CPU torch wheel in ../shared/wheels, no redis-server,
not Linux x86_64, or KVROUTER_SKIP_VLLM set) every test here is skipped with a reason
that starts with "REAL vLLM E2E NOT RUN", and the end of the run says so again.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kvrouter.backends.openai_http import CompletionUsage, generate, request
from kvrouter.client import RouterClient
from kvrouter.testing.vllm_harness import (
    ENGINE_BLOCK_SIZE,
    MODEL_NAME,
    VOCAB_SIZE,
    PrefixCacheCounters,
    VllmFleet,
    VllmFleetConfig,
    Worker,
    scrape_prefix_cache,
    unavailable_reason,
)
from kvrouter.testing.wait import wait_stable, wait_until

ROUTER_BLOCK_SIZE = 16
HEARTBEAT_TTL_S = 3.0
SKIP_BANNER = "REAL vLLM E2E NOT RUN"

_reason = unavailable_reason()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: end-to-end test against real vLLM CPU servers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _reason is None:
        return
    skip = pytest.mark.skip(reason=f"{SKIP_BANNER}: {_reason}")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _reason is None:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if SKIP_BANNER in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_sep("!", f"{SKIP_BANNER}: {len(skipped)} tests skipped", red=True)
        terminalreporter.write_line(f"reason: {_reason}")
        terminalreporter.write_line("kvrouter was not tested against a real vLLM server in this "
                                    "run; see docs/real-vllm.md")


# --------------------------------------------------------------------------- the fleet


@pytest.fixture(scope="session")
def vllm_fleet() -> Iterator[VllmFleet]:
    if _reason is not None:  # a test not marked vllm asked for the fleet
        pytest.skip(f"{SKIP_BANNER}: {_reason}")
    cfg = VllmFleetConfig(workers=2, router_block_size=ROUTER_BLOCK_SIZE, num_gpu_blocks=12,
                      max_model_len=256, heartbeat_ttl_s=HEARTBEAT_TTL_S)
    with VllmFleet(cfg) as fleet:
        yield fleet


@dataclass
class Completion:
    worker: str
    prompt: list[int]
    output: list[int]
    usage: CompletionUsage

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output


class VllmFleetDriver:
    """What the tests do to the fleet: send prompts, ask the router, read engine counters."""

    def __init__(self, fleet: VllmFleet, seed: int) -> None:
        self.fleet = fleet
        self.rng = random.Random(seed)
        self.router = RouterClient(fleet.router_target, timeout=10)

    def close(self) -> None:
        self.router.close()

    def worker(self, name: str) -> Worker:
        return next(w for w in self.fleet.workers if w.name == name)

    def tokens(self, n: int) -> list[int]:
        """Random prompt token ids (4..vocab: 0-3 are the tokenizer's special tokens)."""
        return [self.rng.randrange(4, VOCAB_SIZE) for _ in range(n)]

    def complete(self, name: str, prompt: list[int], max_tokens: int = 8) -> Completion:
        async def run() -> Completion:
            out: list[int] = []
            usage: CompletionUsage | None = None
            async for chunk in generate(self.worker(name).address, MODEL_NAME, prompt, max_tokens,
                                        ignore_eos=True, temperature=0.0, read_timeout=60):
                out += chunk.token_ids
                if chunk.finished:
                    usage = chunk.usage
            assert usage is not None, "vLLM sent no usage (stream_options.include_usage)"
            assert usage.cached_tokens is not None, \
                "vLLM sent no prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details)"
            return Completion(name, list(prompt), out, usage)

        return asyncio.run(run())

    def reset_prefix_cache(self, name: str, nudge: bool = True) -> None:
        """POST /reset_prefix_cache. vLLM 0.32 publishes the resulting AllBlocksCleared
        only with its next engine step, so by default a one-token request follows (it
        fills no block, so it stores nothing) to make the event go out now."""
        status, body = asyncio.run(request(self.worker(name).address, "POST",
                                           "/reset_prefix_cache", timeout=30))
        assert status == 200, f"reset_prefix_cache on {name}: HTTP {status} {body[:200]!r}"
        if nudge:
            self.nudge(name)

    def nudge(self, name: str) -> None:
        """One engine step on `name` that stores no block."""
        self.complete(name, self.tokens(1), max_tokens=1)

    def counters(self, name: str) -> PrefixCacheCounters:
        return scrape_prefix_cache(self.worker(name))

    def overlap(self, name: str, prompt: list[int]) -> int:
        """The router's overlap (router blocks) for `prompt` on worker `name`."""
        d = self.router.explain(prompt, MODEL_NAME, candidates=[name])
        return next(c.gpu_blocks for c in d.candidates if c.worker == name)

    def overlaps(self, prompt: list[int]) -> dict[str, int]:
        d = self.router.explain(prompt, MODEL_NAME)
        return {c.worker: c.gpu_blocks for c in d.candidates}

    def cached_blocks(self, name: str) -> int | None:
        for w in self.router.list_workers(MODEL_NAME):
            if w.name == name:
                return w.cached_blocks
        return None

    def routable(self) -> set[str]:
        return {w.name for w in self.router.list_workers(MODEL_NAME) if w.routable}

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float = 15.0) -> float:
        """Poll until ok() (the event path is asynchronous); returns the seconds it took."""
        t0 = time.monotonic()
        wait_until(ok, timeout, what=what)
        return time.monotonic() - t0

    def settle(self, name: str, quiet_s: float = 0.5, timeout: float = 15.0) -> int:
        """Wait until the router's block count for `name` stops changing (events applied)."""
        return wait_stable(lambda: self.cached_blocks(name), quiet_s, timeout,
                           what=f"router blocks of {name}") or 0


@pytest.fixture
def driver(vllm_fleet: VllmFleet, request: pytest.FixtureRequest) -> Iterator[VllmFleetDriver]:
    """A driver over a fleet whose caches (engines and router) are empty."""
    d = VllmFleetDriver(vllm_fleet, seed=zlib.crc32(request.node.nodeid.encode()))
    try:
        # A test that crashed a worker leaves it down: bring it back first.
        healed = []
        for w in vllm_fleet.workers:
            if w.engine is None or not w.engine.alive():
                vllm_fleet.start_engine(w)
            if w.bridge is None or not w.bridge.alive():
                vllm_fleet.start_bridge(w)
            healed.append(w.name)
        vllm_fleet.wait_routable(healed)
        routable = d.routable()
        for w in vllm_fleet.workers:
            if w.name in routable:
                d.reset_prefix_cache(w.name)
        for w in vllm_fleet.workers:
            if w.name in routable:
                d.wait_for(f"router forgets {w.name}'s blocks after reset_prefix_cache",
                           lambda n=w.name: d.cached_blocks(n) == 0)
        yield d
    finally:
        d.close()


__all__ = ["ENGINE_BLOCK_SIZE", "HEARTBEAT_TTL_S", "ROUTER_BLOCK_SIZE", "Completion", "VllmFleetDriver"]
