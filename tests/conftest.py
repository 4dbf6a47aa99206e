"""Shared fixtures: free ports and a real `kvrouter serve` subprocess on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kvrouter.demo import child_env


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return find_free_port()


subprocess_env = child_env


def stop_process(proc: subprocess.Popen[Any]) -> int:
    """SIGTERM, then SIGKILL if it has not exited within 10 s; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


@dataclass
class RouterProcess:
    proc: subprocess.Popen[str]
    target: str
    port: int
    metrics_port: int
    config_path: Path
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        return stop_process(self.proc)


def wait_serving(target: str, proc: subprocess.Popen[str] | None = None,
                 timeout: float = 30.0) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"router exited with status {proc.returncode} during start")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"router at {target} not serving after {timeout}s")


def start_router(workdir: Path, config: Mapping[str, Any] | None = None,
                 args: tuple[str, ...] = (), metrics: bool = False,
                 env: Mapping[str, str] | None = None) -> RouterProcess:
    """Start `python -m kvrouter.cli serve` with a YAML config file and wait for health."""
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(3):  # a free port can be taken between probe and bind
        port = find_free_port()
        mport = find_free_port() if metrics else 0
        cfg_path = workdir / f"router-{port}.yaml"
        cfg_path.write_text(yaml.safe_dump(dict(config or {})))
        log_path = workdir / f"router-{port}.log"
        cmd = [sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(cfg_path),
               "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport), *args]
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    env=subprocess_env(env))
        rp = RouterProcess(proc, f"127.0.0.1:{port}", port, mport, cfg_path, log_path)
        try:
            wait_serving(rp.target, proc)
            return rp
        except (RuntimeError, TimeoutError) as e:
            rp.stop()
            last_error = RuntimeError(f"{e} (attempt {attempt + 1}); log:\n{rp.logs()}")
    assert last_error is not None
    raise last_error


@pytest.fixture
def router_server(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Factory: `router_server(config_dict, args=(...), metrics=False)`; all stopped at teardown."""
    started: list[RouterProcess] = []

    def start(config: Mapping[str, Any] | None = None, args: tuple[str, ...] = (),
              metrics: bool = False, env: Mapping[str, str] | None = None) -> RouterProcess:
        rp = start_router(tmp_path / f"r{len(started)}", config, args, metrics, env)
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


@pytest.fixture(scope="module")
def module_router_server(tmp_path_factory: pytest.TempPathFactory,
                         ) -> Iterator[Callable[..., RouterProcess]]:
    """Like router_server, for servers shared by the tests of one module."""
    started: list[RouterProcess] = []
    base = tmp_path_factory.mktemp("router")

    def start(config: Mapping[str, Any] | None = None, args: tuple[str, ...] = (),
              metrics: bool = False, env: Mapping[str, str] | None = None) -> RouterProcess:
        rp = start_router(base / f"r{len(started)}", config, args, metrics, env)
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


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
        deadline = time.monotonic() + 10
        while self._cached(client, model, worker) < before + n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} blocks for {model}/{worker} not applied in 10s")
            time.sleep(0.01)

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
    return subprocess.run([sys.executable, "-m", "kvrouter.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


@pytest.fixture
def kvrouter_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m kvrouter.cli ARGS...` in a child process; returns CompletedProcess."""
    return run_cli
