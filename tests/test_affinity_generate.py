"""Session affinity on Router.Generate (proxy mode) and through the OpenAI HTTP front (the
x-session-id header), with simulated engines as processes: a session's next turn stays on
its worker even when another worker caches that prompt."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.processes import free_port
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


@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Engines]]:
    cfg = router_config()
    cfg["router"]["http"] = f"127.0.0.1:{free_port()}"  # the OpenAI front too
    router = module_router_server(cfg)
    engines = Engines(tmp_path_factory.mktemp("engines"), router.target)
    engines.workdir.mkdir(parents=True, exist_ok=True)
    try:
        engines.start("aggregated", name="a1")
        engines.start("aggregated", name="a2")
        wait_routable(router.target, {"a1", "a2"})
        yield router, engines
    finally:
        engines.stop_all()


def warm(router: Any, engines: Engines, worker: str, tokens: list[int]) -> None:
    """Run `tokens` on `worker`'s engine directly, until the router indexed its blocks."""
    with grpc.insecure_channel(engines.procs[worker].address) as ch:
        req = engine_pb2.GenerateRequest(request_id=f"warm-{tokens[0]}", token_ids=tokens,
                                         sampling=common_pb2.SamplingParams(max_tokens=1))
        for _ in engine_pb2_grpc.EngineStub(ch).Generate(req, timeout=60):
            pass
    with RouterClient(router.target) as rc:
        wait_until(lambda: rc.explain(tokens).worker == worker, 20,
                   what=f"the prompt's blocks indexed on {worker}")


def test_generate_keeps_a_session_on_its_worker(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    first = generate(router.target, prompt(1, 256), 4, session_id="gen-session")
    assert first.code == grpc.StatusCode.OK, first.details
    assert first.metadata["kvrouter-affinity"] == "new"
    home = first.workers[-1]
    other = ({"a1", "a2"} - {home}).pop()
    # the next turn's prompt is cached on the other worker (run there directly)
    turn = prompt(2, 512)
    warm(router, engines, other, turn)
    again = generate(router.target, turn, 4, session_id="gen-session")
    assert again.code == grpc.StatusCode.OK, again.details
    assert (again.metadata["kvrouter-affinity"], again.workers) == ("kept", [home])
    # (without the session key the cache decided: the wait above saw Explain pick `other`)
    plain = generate(router.target, prompt(3, 64), 2)
    assert plain.code == grpc.StatusCode.OK and "kvrouter-affinity" not in plain.metadata
    wait_no_reservations(router.target)


def test_http_front_keeps_a_session_by_its_header(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    base = "http://" + router_http(router)

    def served() -> dict[str, float]:
        return {n: engine_stats(e.address)["requests"] for n, e in engines.procs.items()}

    def complete(tokens: list[int], affinity: str) -> str:
        before = served()
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"model": "default", "prompt": tokens, "max_tokens": 2},
                       headers={"x-session-id": "http-session"})
        assert r.status_code == 200, r.text
        grew = [n for n, v in served().items() if v > before[n]]
        assert len(grew) == 1
        # the front says what the proxy did, affinity included
        assert r.headers["x-kvrouter-affinity"] == affinity
        assert r.headers["x-kvrouter-worker"] == grew[0]
        return grew[0]

    home = complete(prompt(21, 256), "new")
    other = ({"a1", "a2"} - {home}).pop()
    turn = prompt(22, 512)
    warm(router, engines, other, turn)
    assert complete(turn, "kept") == home
    wait_no_reservations(router.target)


def router_http(router: Any) -> str:
    import yaml

    return str(yaml.safe_load(router.config_path.read_text())["router"]["http"])


def test_generate_moves_a_session_off_an_overloaded_worker(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    first = generate(router.target, prompt(41, 256), 2, session_id="gen-overload")
    home = first.workers[-1]
    other = ({"a1", "a2"} - {home}).pop()
    turn = prompt(42, 512)
    warm(router, engines, home, turn)  # cached on home: the cache alone would keep it there
    with RouterClient(router.target) as rc:
        # more prompt tokens waiting on home than overload_prefill_tokens (32768 by default)
        held = rc.route(prompt(43, 40_000), candidates=[home])
        try:
            moved = generate(router.target, turn, 2, session_id="gen-overload")
        finally:
            rc.release(held.request_id)
    assert moved.code == grpc.StatusCode.OK, moved.details
    assert (moved.metadata["kvrouter-affinity"], moved.workers) == ("moved", [other])
    wait_no_reservations(router.target)
