"""Router.Generate (proxy mode) against simulated engines running as processes over gRPC:
aggregated and disaggregated paths, specialisation, conditional disaggregation, bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2
from kvrouter.client import RouterClient
from kvrouter.protocol import lora_extra_key
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import (
    Engines,
    engine_stats,
    generate,
    prompt,
    router_config,
    wait_no_reservations,
    wait_routable,
)

AGG = router_pb2.GENERATE_MODE_AGGREGATED
DISAGG = router_pb2.GENERATE_MODE_DISAGGREGATED


@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Engines]]:
    """One aggregated worker (pool 'aggregated'), one prefill + one decode ('disaggregated')."""
    router = module_router_server(router_config())
    engines = Engines(tmp_path_factory.mktemp("engines"), router.target)
    try:
        engines.start("aggregated", name="agg")
        engines.start("prefill", name="pre")
        engines.start("decode", name="dec")
        wait_routable(router.target, {"agg", "pre", "dec"})
        yield router, engines
    finally:
        engines.stop_all()


def test_short_input_runs_aggregated(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    before = engine_stats(engines.procs["agg"].address)["requests"]
    rep = generate(router.target, prompt(1, 100), 12)
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert len(rep.tokens) == 12 and rep.workers == ["agg"]
    assert rep.final.finished and rep.final.usage.completion_tokens == 12
    assert rep.final.usage.prompt_tokens == 100
    assert rep.metadata["kvrouter-path"] == "aggregated"
    assert rep.metadata["kvrouter-class"] == "short"
    assert engine_stats(engines.procs["agg"].address)["requests"] == before + 1
    wait_no_reservations(router.target)


def test_medium_input_prefills_remotely_and_decodes_with_imported_kv(
        fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    pre, dec = engines.procs["pre"].address, engines.procs["dec"].address
    p0, d0 = engine_stats(pre), engine_stats(dec)
    rep = generate(router.target, prompt(2, 3000), 10)
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert rep.metadata["kvrouter-path"] == "disaggregated"
    assert rep.metadata["kvrouter-prefill-worker"] == "pre"
    assert rep.metadata["kvrouter-worker"] == "dec"
    # first token from the context phase, the rest from the decode worker: one stream
    assert rep.workers == ["pre", "dec"] and len(rep.tokens) == 10
    assert rep.responses[0].token_ids and not rep.responses[0].finished
    assert [r.finished for r in rep.responses].count(True) == 1
    p1, d1 = engine_stats(pre), engine_stats(dec)
    assert p1["prefill_tokens"] - p0["prefill_tokens"] == 3000
    # the decode engine computed nothing of the prompt: it imported the KV
    assert d1["prefill_tokens"] == d0["prefill_tokens"]
    assert d1["decode_tokens"] - d0["decode_tokens"] == 9
    wait_no_reservations(router.target)


def test_prefix_held_by_decode_worker_means_local_prefill(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    toks = prompt(3, 2000)
    first = generate(router.target, toks, 4)
    assert first.metadata["kvrouter-path"] == "disaggregated", first.metadata
    # the decode worker now caches the imported prompt; once the router knows it, the
    # uncached part is tiny and the prefill runs locally there (conditional disaggregation)
    with RouterClient(router.target) as rc:
        wait_until(lambda: {w.name: w.cached_blocks for w in rc.list_workers()}["dec"] >= 120,
                   10, what="decode worker's blocks indexed")
    pre = engines.procs["pre"].address
    n0 = engine_stats(pre)["requests"]
    again = generate(router.target, toks + prompt(4, 30), 4)
    assert again.code == grpc.StatusCode.OK, again.details
    assert again.metadata["kvrouter-path"] == "local_prefill"
    assert again.workers == ["dec"] and len(again.tokens) == 4
    assert engine_stats(pre)["requests"] == n0
    wait_no_reservations(router.target)


def test_modes_force_the_path(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    rep = generate(router.target, prompt(5, 200), 6, mode=DISAGG)
    assert rep.metadata["kvrouter-path"] == "disaggregated" and len(rep.tokens) == 6
    rep = generate(router.target, prompt(6, 200), 6, disaggregated=True)
    assert rep.metadata["kvrouter-path"] == "disaggregated"
    rep = generate(router.target, prompt(7, 3000), 6, mode=AGG)
    assert rep.metadata["kvrouter-path"] == "aggregated" and rep.workers == ["agg"]
    # one token only: nothing to decode, served by the context worker's first token
    rep = generate(router.target, prompt(8, 3000), 1, mode=DISAGG)
    assert rep.code == grpc.StatusCode.OK and len(rep.tokens) == 1 and rep.workers == ["pre"]
    wait_no_reservations(router.target)


def test_bad_requests_get_clear_errors(fleet: tuple[Any, Engines]) -> None:
    router, _ = fleet
    rep = generate(router.target, [], 4)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in rep.details
    rep = generate(router.target, [40000], 4)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT and "vocab_size" in rep.details
    rep = generate(router.target, [1, 2], 4, model="nope")
    assert rep.code == grpc.StatusCode.NOT_FOUND and "unknown model" in rep.details
    rep = generate(router.target, [1, 2], 4, mode=AGG, disaggregated=True)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT and "contradicts" in rep.details
    rep = generate(router.target, [1, 2], 4, expected_output_tokens=-1)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT and "expected_output_tokens" in rep.details
    assert not rep.responses
    wait_no_reservations(router.target)


def test_no_worker_is_unavailable(router_server: Callable[..., Any]) -> None:
    router = router_server(router_config())
    rep = generate(router.target, prompt(9, 64), 4)
    assert rep.code == grpc.StatusCode.UNAVAILABLE and "no routable worker" in rep.details


def test_pools_by_metadata_and_long_context(router_server: Callable[..., Any],
                                            tmp_path: Path) -> None:
    """A long-context pool gets long inputs; without a decode worker in a pool its prefill
    workers are never used alone."""
    router = router_server(router_config(
        specialisation={"short_input_tokens": 256, "long_input_tokens": 1024}))
    engines = Engines(tmp_path, router.target)
    try:
        engines.start("aggregated", name="agg")
        engines.start("prefill", "--pool", "long-context", name="lpre")
        engines.start("decode", "--pool", "long-context", name="ldec")
        wait_routable(router.target, {"agg", "lpre", "ldec"})
        rep = generate(router.target, prompt(10, 1500), 5)
        assert rep.metadata["kvrouter-pool"] == "long-context", rep.metadata
        assert rep.metadata["kvrouter-class"] == "long"
        assert rep.metadata["kvrouter-path"] == "disaggregated" and rep.workers == ["lpre", "ldec"]
        # medium input: no 'disaggregated' pool, falls back to long-context before aggregated
        rep = generate(router.target, prompt(11, 600), 5)
        assert rep.metadata["kvrouter-pool"] == "long-context"
        rep = generate(router.target, prompt(12, 100), 5)
        assert rep.metadata["kvrouter-pool"] == "aggregated" and rep.workers == ["agg"]
        wait_no_reservations(router.target)
    finally:
        engines.stop_all()


def test_lora_name_alone_routes_on_the_adapters_blocks(router_server: Callable[..., Any],
                                                       tmp_path: Path) -> None:
    """Generate with only `lora_name` is hashed with the adapter's extra key
    (kvrouter.protocol.extra_key_for), the key engines tag the adapter's blocks with."""
    router = router_server(router_config())
    engines = Engines(tmp_path, router.target)
    try:
        base, tuned = engines.start("aggregated", name="base"), engines.start("aggregated",
                                                                            name="tuned")
        wait_routable(router.target, {"base", "tuned"})
        toks = prompt(20, 6 * 16)
        # The same prompt cached for the base model on one worker, for adapter "ad" on the other.
        _engine_generate(base.address, toks, 1)
        _engine_generate(tuned.address, toks, 1, lora_name="ad")
        key = lora_extra_key("ad")
        with RouterClient(router.target) as rc:

            def indexed_and_idle() -> bool:
                # Both workers' blocks indexed, and no load left from the warm-up requests
                # (their last load reports land a moment later): overlap alone decides.
                for k in (key, None):
                    for c in rc.route(toks, extra_key=k, dry_run=True, explain=True).candidates:
                        if (c.new_prefill_tokens, c.decode_blocks, c.queue) != (
                                len(toks) - 16 * c.gpu_blocks, 0, 0):
                            return False
                return (rc.route(toks, extra_key=key, dry_run=True).overlap_blocks == 6
                        and rc.route(toks, dry_run=True).overlap_blocks == 6)

            wait_until(indexed_and_idle, 10, what="both workers' blocks indexed, workers idle")
            assert rc.route(toks, extra_key=key, dry_run=True).worker == "tuned"
            assert rc.route(toks, dry_run=True).worker == "base"
        rep = generate(router.target, toks, 3, mode=AGG, lora_name="ad")
        assert rep.code == grpc.StatusCode.OK, rep.details
        assert rep.workers == ["tuned"] and rep.final.usage.cached_tokens > 0
        rep = generate(router.target, toks, 3, mode=AGG)
        assert rep.code == grpc.StatusCode.OK, rep.details
        assert rep.workers == ["base"]
        wait_no_reservations(router.target)
    finally:
        engines.stop_all()


def _engine_generate(address: str, tokens: list[int], max_tokens: int, **kw: Any) -> None:
    """One Generate straight to an engine (not through the router), run to the end."""
    with grpc.insecure_channel(address) as ch:
        req = engine_pb2.GenerateRequest(token_ids=tokens, sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens), **kw)
        assert list(engine_pb2_grpc.EngineStub(ch).Generate(req, timeout=60))[-1].finished
