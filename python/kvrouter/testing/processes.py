"""Process-fleet helpers: a router and simulated engines as child processes on loopback.

Shared by the demo, the tests, the benches and the vLLM harness. Children run the
installed package with the interpreter running this code (`sys.executable -m
kvrouter ...`): nothing is put on PYTHONPATH, so a regular (non-editable) install runs
the same code as an editable one. Every child logs to a file, runs in a session (process
group) of its own and is stopped by group; a failed start reports the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from kvrouter.testing.wait import ProcessExited, WaitTimeout, wait_until

# How a child runs kvrouter: the installed package, under this interpreter.
KVROUTER = (sys.executable, "-m", "kvrouter")


def kvrouter_cmd(*args: str) -> list[str]:
    """`python -m kvrouter ARGS...` with the interpreter running this code."""
    return [*KVROUTER, *args]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for kvrouter children: this environment without any KVROUTER_* setting
    (meant for some other router), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTER_")}
    env.update(extra or {})
    return env


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0, *, group: bool = False,
                 sig: int = signal.SIGTERM) -> int:
    """`sig` (SIGTERM), then SIGKILL if it has not exited within `grace_s`; returns the exit
    code. With `group`, signals go to the child's process group (a child started with
    start_new_session) and what is left of the group is killed after the leader exits:
    vLLM forks an engine-core process that must not outlive it."""
    stop_processes([proc], grace_s, group=group, sig=sig)
    return int(proc.returncode)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace_s: float = 10.0, *,
                   group: bool = False, sig: int = signal.SIGTERM) -> None:
    """`stop_process` for several at once: all are signalled, then share one grace period."""

    def send(p: subprocess.Popen[Any], s: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(p.pid, s)
            else:
                p.send_signal(s)

    for p in procs:
        if p.poll() is None:
            send(p, sig)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            send(p, signal.SIGKILL)
            p.wait(10)
        if group:
            send(p, signal.SIGKILL)


@dataclass
class ChildProcess:
    """A child process in a session of its own, logging to a file."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = child_env() if self.env is None else self.env
        with self.log_path.open("ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            log.flush()
            # A session of its own: a Ctrl-C at the terminal reaches only the parent, which
            # then stops its children in order.
            self.popen = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"    {line}" for line in self.logs().splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop the whole process group (SIGKILL after `grace_s`); the exit code."""
        if self.popen is None:
            return None
        return stop_process(self.popen, grace_s, group=True, sig=sig)

    def kill(self) -> int | None:
        """SIGKILL the group at once (a crash, not a shutdown)."""
        return self.stop(0.0, sig=signal.SIGKILL)


def stop_children(children: Sequence[ChildProcess], grace_s: float = 10.0) -> None:
    """Stop several children at once (one grace period for all)."""
    stop_processes([c.popen for c in children if c.popen is not None], grace_s, group=True)


def wait_grpc_serving(target: str, timeout: float, procs: Sequence[ChildProcess] = (),
                      what: str = "", security: Any = None) -> None:
    """Poll the standard gRPC health service at `target` until it says SERVING (`security`:
    a kvrouter.security.channels.ClientSecurity for a TLS listener; default plaintext)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvrouter.security.channels import ClientSecurity

    with (security or ClientSecurity()).channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        wait_until(serving, timeout, interval=0.05, what=what or f"{target} serving",
                   procs=procs, ignore=(grpc.RpcError,))


def start_redis_server(port: int, log_path: Path, env: Mapping[str, str] | None = None,
                       timeout: float = 20.0) -> ChildProcess:
    """A private redis-server on 127.0.0.1:`port` without persistence (a restart loses
    everything), returned once it answers PING; killed again when it does not."""
    proc = ChildProcess(
        "redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--daemonize", "no"],
        log_path, None if env is None else dict(env)).start()

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        wait_until(ping, timeout, interval=0.05, what=f"redis-server on port {port}",
                   procs=[proc], ignore=(OSError,))
    except BaseException:
        proc.kill()
        raise
    return proc


# ---------------------------------------------------------------------- the router


@dataclass
class RouterProcess(ChildProcess):
    """`kvrouter serve` on loopback."""

    port: int = 0
    metrics_port: int = 0
    config_path: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_router(workdir: Path, config: Mapping[str, Any] | None = None,
                 args: Sequence[str] = (), *, metrics: bool = False,
                 env: Mapping[str, str] | None = None, timeout: float = 30.0,
                 name: str = "router", security: Any = None) -> RouterProcess:
    """Start `kvrouter serve` on a free port (with `config` as its YAML file when given,
    /metrics on a free port with `metrics`) and wait until it serves gRPC health (over TLS
    with `security`, a kvrouter.security.channels.ClientSecurity)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        mport = free_port() if metrics else 0
        cmd = kvrouter_cmd("serve", "--listen", f"127.0.0.1:{port}", "--metrics-port", str(mport))
        cfg_path = None
        if config is not None:
            cfg_path = workdir / f"{name}-{port}.yaml"
            cfg_path.write_text(yaml.safe_dump(dict(config)))
            cmd += ["--config", str(cfg_path)]
        rp = RouterProcess(name=f"{name}-{attempt}" if attempt else name, cmd=[*cmd, *args],
                           log_path=workdir / f"{name}-{port}.log", env=child_env(env),
                           port=port, metrics_port=mport, config_path=cfg_path)
        rp.start()
        try:
            wait_grpc_serving(rp.target, timeout, [rp], what=f"router at {rp.target} serving",
                              security=security)
            return rp
        except (ProcessExited, WaitTimeout) as e:
            rp.stop(2.0)
            last_error = e
            if isinstance(e, WaitTimeout):
                break  # it ran but never served: another try would not help
    assert last_error is not None
    raise last_error


# ---------------------------------------------------------------------- simulated engines


@dataclass
class SimEngineProcess(ChildProcess):
    """`kvrouter engine sim`; `address` is its Engine gRPC address once it serves."""

    ready_file: Path | None = None
    address: str = ""


def sim_engine(workdir: Path, name: str, *, router: str | None = None,
               redis: str | None = None, namespace: str | None = None,
               args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> SimEngineProcess:
    """A simulated engine (not started) reporting to the router at `router` over gRPC or to
    the Redis event plane at `redis`; `args` are further `kvrouter engine sim` flags."""
    ready = workdir / f"{name}.ready"
    cmd = kvrouter_cmd("engine", "sim", "--worker-id", name, "--listen", "127.0.0.1:0",
                       "--ready-file", str(ready))
    if router:
        cmd += ["--router", router]
    if redis:
        cmd += ["--redis", redis]
    if namespace:
        cmd += ["--namespace", namespace]
    return SimEngineProcess(name=name, cmd=[*cmd, *args], log_path=workdir / f"{name}.log",
                     env=child_env(env), ready_file=ready)


def wait_engine_serving(engine: SimEngineProcess, timeout: float) -> str:
    """Until the engine wrote its address to its ready file; returns the address."""
    ready = engine.ready_file
    assert ready is not None

    def address() -> str:
        return ready.read_text().strip() if ready.exists() else ""

    engine.address = wait_until(address, timeout, what=f"engine {engine.name} serving",
                                procs=[engine])
    return engine.address


def start_sim_engine(workdir: Path, name: str, *, timeout: float = 60.0,
                     **kwargs: Any) -> SimEngineProcess:
    """`sim_engine(...)` started and serving (stopped again if it does not come up)."""
    eng = sim_engine(workdir, name, **kwargs)
    eng.start()
    try:
        wait_engine_serving(eng, timeout)
    except BaseException:
        eng.stop(2.0)
        raise
    return eng


__all__ = ["KVROUTER", "ChildProcess", "RouterProcess", "SimEngineProcess",
           "child_env", "free_port", "kvrouter_cmd", "sim_engine", "start_router",
           "start_sim_engine", "stop_children", "stop_process", "stop_processes",
           "wait_engine_serving", "wait_grpc_serving"]
