"""Helpers of the Router.Generate tests: simulated engines as processes, calls, metadata."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.processes import SimEngineProcess, start_sim_engine
from kvrouter.testing.wait import wait_until

BS = 16


def router_config(heartbeat_s: float = 30.0, **disagg: Any) -> dict[str, Any]:
    return {
        # long liveness by default: a killed engine stays registered (and routable) for the
        # test's duration, so the proxy's own failover is what is tested, and reservations
        # left on it would show
        "router": {"heartbeat_timeout_s": heartbeat_s,
                   "event_plane": {"heartbeat_ttl_s": heartbeat_s}},
        "models": [{"name": "default", "block_size": BS, "vocab_size": 32000,
                    "disagg": {"suspect_s": 30.0, **disagg}}],
    }


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


@dataclass
class Reply:
    tokens: list[int]
    responses: list[engine_pb2.GenerateResponse]
    metadata: dict[str, str]
    code: grpc.StatusCode
    details: str = ""
    workers: list[str] = field(default_factory=list)

    @property
    def final(self) -> engine_pb2.GenerateResponse:
        return self.responses[-1]


def generate(target: str, tokens: list[int], max_tokens: int, *, mode: int = 0,
             request_id: str = "", on_response: Callable[[engine_pb2.GenerateResponse], None]
             | None = None, timeout: float = 120.0, **kw: Any) -> Reply:
    """Call Router.Generate; collect the stream, the trailing metadata and the status."""
    with grpc.insecure_channel(target) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        req = router_pb2.RouterGenerateRequest(
            token_ids=tokens, request_id=request_id or uuid.uuid4().hex, mode=mode,  # type: ignore[arg-type]
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens), **kw)
        call = stub.Generate(req, timeout=timeout)
        out: list[engine_pb2.GenerateResponse] = []
        code = grpc.StatusCode.OK
        details = ""
        try:
            for resp in call:
                out.append(resp)
                if on_response is not None:
                    on_response(resp)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
        md = {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
    toks = [t for r in out for t in r.token_ids]
    workers = []
    for r in out:
        if not workers or workers[-1] != r.worker:
            workers.append(r.worker)
    return Reply(toks, out, md, code, details, workers)


def engine_stats(address: str) -> dict[str, float]:
    with grpc.insecure_channel(address) as ch:
        resp = engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(), timeout=10)
        return dict(resp.extra)


def reservations(target: str) -> dict[str, int]:
    with RouterClient(target) as rc:
        return {w.name: w.reserved_requests for w in rc.list_workers()}


def routable(target: str) -> set[str]:
    with RouterClient(target) as rc:
        return {w.name for w in rc.list_workers() if w.routable}


def wait_routable(target: str, names: set[str]) -> None:
    wait_until(lambda: names <= routable(target), 30, what=f"workers {sorted(names)} routable")


def wait_no_reservations(target: str) -> None:
    """Releases happen as the handler ends, just after the client saw the status: poll."""
    wait_until(lambda: not any(reservations(target).values()), 10, what="no reservation left")


class Engines:
    """Engine processes of one test; all stopped at teardown."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.target = target
        self.procs: dict[str, SimEngineProcess] = {}

    def start(self, role: str, *extra: str, name: str = "") -> SimEngineProcess:
        name = name or f"{role[:3]}-{uuid.uuid4().hex[:6]}"
        eng = start_sim_engine(self.workdir, name, router=self.target,
                               args=("--time-scale", "0.2", "--role", role, *extra))
        self.procs[name] = eng
        return eng

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def stop_all(self) -> None:
        for e in self.procs.values():
            e.stop()


def engines_fixture(router_server: Callable[..., Any], tmp_path: Path,
                    config: dict[str, Any]) -> Iterator[tuple[Any, Engines]]:
    router = router_server(config)
    engines = Engines(tmp_path / "engines", router.target)
    engines.workdir.mkdir(parents=True, exist_ok=True)
    try:
        yield router, engines
    finally:
        engines.stop_all()

