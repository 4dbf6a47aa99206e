"""Session affinity on Router.Generate (proxy mode), with simulated engines as processes:
a session's next turn stays on its worker even when another worker caches that prompt."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import (
    Engines,
    generate,
    prompt,
    router_config,
    wait_no_reservations,
    wait_routable,
)


@pytest.fixture
def fleet(router_server: Callable[..., Any], tmp_path: Path) -> Iterator[tuple[Any, Engines]]:
    router = router_server(router_config())
    engines = Engines(tmp_path / "engines", router.target)
    engines.workdir.mkdir(parents=True, exist_ok=True)
    try:
        engines.start("aggregated", name="a1")
        engines.start("aggregated", name="a2")
        wait_routable(router.target, {"a1", "a2"})
        yield router, engines
    finally:
        engines.stop_all()


def test_generate_keeps_a_session_on_its_worker(fleet: tuple[Any, Engines]) -> None:
    router, engines = fleet
    first = generate(router.target, prompt(1, 256), 4, session_id="gen-session")
    assert first.code == grpc.StatusCode.OK, first.details
    assert first.metadata["kvrouter-affinity"] == "new"
    home = first.workers[-1]
    other = ({"a1", "a2"} - {home}).pop()
    # the next turn's prompt is cached on the other worker (run there directly)
    turn = prompt(2, 512)
    with grpc.insecure_channel(engines.procs[other].address) as ch:
        req = engine_pb2.GenerateRequest(request_id="warm", token_ids=turn,
                                         sampling=common_pb2.SamplingParams(max_tokens=1))
        for _ in engine_pb2_grpc.EngineStub(ch).Generate(req, timeout=60):
            pass
    with RouterClient(router.target) as rc:
        wait_until(lambda: rc.explain(turn).worker == other, 20,
                   what="the turn's blocks indexed on the other worker")
    again = generate(router.target, turn, 4, session_id="gen-session")
    assert again.code == grpc.StatusCode.OK, again.details
    assert (again.metadata["kvrouter-affinity"], again.workers) == ("kept", [home])
    # (without the session key the cache decided: the wait above saw Explain pick `other`)
    plain = generate(router.target, prompt(3, 64), 2)
    assert plain.code == grpc.StatusCode.OK and "kvrouter-affinity" not in plain.metadata
    wait_no_reservations(router.target)
