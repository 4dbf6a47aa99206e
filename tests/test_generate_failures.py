"""Router.Generate when engines die (killed processes): the client gets one coherent stream
or a clear status, and no reservation is left behind.

Killed engines stay registered (long heartbeat timeout), so the router really calls dead
addresses and must fail over by itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import engine_pb2, router_pb2
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import (
    Engines,
    Reply,
    engine_stats,
    generate,
    prompt,
    reservations,
    router_config,
    wait_no_reservations,
    wait_routable,
)

DISAGG = router_pb2.GENERATE_MODE_DISAGGREGATED


@pytest.fixture
def setup(router_server: Callable[..., Any], tmp_path: Path) -> Iterator[tuple[Any, Engines]]:
    router = router_server(router_config())
    engines = Engines(tmp_path, router.target)
    try:
        yield router, engines
    finally:
        engines.stop_all()


def in_background(fn: Callable[[], Reply]) -> tuple[threading.Thread, list[Reply]]:
    out: list[Reply] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def busy(engines: Engines, name: str) -> Callable[[], bool]:
    return lambda: engine_stats(engines.procs[name].address)["requests"] >= 1


def importing_on_slow_decode(router: Any, engines: Engines, seed: int,
                             ) -> tuple[threading.Thread, list[Reply]]:
    """Prefill worker `pre`, decode worker `slow` and a disaggregated request in the
    background that `slow` holds while it imports the KV over a very slow link (~10 s,
    sim); then a second decode worker `fast`, routable."""
    engines.start("prefill", name="pre")
    engines.start("decode", "--link-gbps", "0.005", name="slow")
    wait_routable(router.target, {"pre", "slow"})
    t, out = in_background(lambda: generate(router.target, prompt(seed, 1500), 8, mode=DISAGG))
    wait_until(busy(engines, "slow"), 30, what="generation-only request on the slow decode worker")
    engines.start("decode", name="fast")
    wait_routable(router.target, {"fast"})
    return t, out


def test_decode_dies_while_importing_then_decodes_elsewhere(
        setup: tuple[Any, Engines]) -> None:
    router, engines = setup
    t, out = importing_on_slow_decode(router, engines, seed=1)
    engines.kill("slow")
    t.join(60)
    (rep,) = out
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert len(rep.tokens) == 8 and rep.workers == ["pre", "fast"]
    assert rep.metadata["kvrouter-path"] == "disaggregated"
    assert rep.metadata["kvrouter-failovers"] == "decode:slow:worker"
    # the KV came from the prefill worker again: no second prefill anywhere
    assert engine_stats(engines.procs["pre"].address)["requests"] == 1
    assert engine_stats(engines.procs["fast"].address)["prefill_tokens"] == 0
    wait_no_reservations(router.target)


def test_kv_lost_with_the_prefill_worker_means_prefill_again(
        setup: tuple[Any, Engines]) -> None:
    router, engines = setup
    t, out = importing_on_slow_decode(router, engines, seed=2)
    engines.kill("pre")
    engines.kill("slow")
    t.join(60)
    (rep,) = out
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert len(rep.tokens) == 8
    assert rep.metadata["kvrouter-failovers"] == "decode:slow:worker;decode:fast:kv_lost"
    assert rep.metadata["kvrouter-path"] == "local_prefill"
    assert rep.metadata["kvrouter-worker"] == "fast"
    # the first token (from the dead prefill worker) was already streamed; the rest follows
    assert rep.workers == ["pre", "fast"] and rep.final.usage.completion_tokens == 8
    assert engine_stats(engines.procs["fast"].address)["prefill_tokens"] >= 1500
    wait_no_reservations(router.target)


def test_prefill_dies_then_aggregated_on_the_decode_worker(setup: tuple[Any, Engines]) -> None:
    router, engines = setup
    # a prefill engine 50x slower than real time: its prefill takes seconds of wall time
    engines.start("prefill", "--time-scale", "50", name="pre")
    engines.start("decode", name="dec")
    wait_routable(router.target, {"pre", "dec"})
    t, out = in_background(lambda: generate(router.target, prompt(3, 4000), 6, mode=DISAGG))
    wait_until(busy(engines, "pre"), 30, what="context request on the prefill worker")
    engines.kill("pre")
    t.join(60)
    (rep,) = out
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert rep.workers == ["dec"] and len(rep.tokens) == 6
    assert rep.metadata["kvrouter-path"] == "local_prefill"
    assert rep.metadata["kvrouter-failovers"] == "prefill:pre:worker"
    wait_no_reservations(router.target)
    # the dead prefill worker is avoided by the next request too (no wasted call)
    rep = generate(router.target, prompt(4, 4000), 3, mode=DISAGG)
    assert rep.code == grpc.StatusCode.OK and rep.workers == ["dec"]
    assert "kvrouter-failovers" not in rep.metadata
    wait_no_reservations(router.target)


def test_worker_dies_mid_stream_and_the_stream_continues(setup: tuple[Any, Engines]) -> None:
    router, engines = setup
    engines.start("aggregated", "--time-scale", "1", name="a1")
    engines.start("aggregated", "--time-scale", "1", name="a2")
    wait_routable(router.target, {"a1", "a2"})
    first: list[str] = []
    killed = threading.Event()

    def on_response(resp: engine_pb2.GenerateResponse) -> None:
        # kill whichever worker streams, once it has streamed some tokens
        if not first:
            first.append(resp.worker)
        elif not killed.is_set():
            killed.set()
            engines.kill(first[0])

    rep = generate(router.target, prompt(5, 300), 400, on_response=on_response)
    assert killed.is_set()
    assert rep.code == grpc.StatusCode.OK, rep.details
    assert len(rep.tokens) == 400 and rep.final.usage.completion_tokens == 400
    other = ({"a1", "a2"} - {first[0]}).pop()
    assert rep.workers == [first[0], other]
    assert rep.metadata["kvrouter-failovers"] == f"generate:{first[0]}:worker"
    # the survivor continued after the streamed tokens: its prompt was prompt + those tokens
    st = engine_stats(engines.procs[other].address)
    assert st["prefill_tokens"] + st["reused_tokens"] > 300
    wait_no_reservations(router.target)


def test_everything_dead_is_a_clear_error_without_leaks(setup: tuple[Any, Engines]) -> None:
    router, engines = setup
    engines.start("prefill", name="pre")
    engines.start("decode", name="dec")
    wait_routable(router.target, {"pre", "dec"})
    engines.kill("pre")
    engines.kill("dec")
    rep = generate(router.target, prompt(6, 2000), 8, mode=DISAGG)
    assert rep.code == grpc.StatusCode.UNAVAILABLE
    assert "dec" in rep.details and not rep.tokens
    assert set(reservations(router.target)) == {"pre", "dec"}  # still registered
    wait_no_reservations(router.target)
