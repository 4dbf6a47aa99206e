"""Local actuator: engine processes on this machine, started from a command template.

Each worker is one child process (its own session, output to `<workdir>/<name>.log`).
The template is a list of arguments with `{name}`, `{role}`, `{pool}`, `{model}` and
`{router}` placeholders (`{pool}`: `pool` for prefill and decode workers, `aggregated_pool`
for aggregated ones, which the router's specialiser sends short requests to); the default
runs a simulated engine that registers with the router itself (`kvrouter engine sim ...
--router {router}`), so "ready" is what the router says. A process that exits by itself
drops out of `workers()`, and the planner replaces it at its next tick. `stop` sends
SIGTERM, then SIGKILL after `grace_s`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvrouter.autoscale.actuators import ActuatorError, Launched
from kvrouter.planner import AGGREGATED_POOL
from kvrouter.registry import Role

log = logging.getLogger("kvrouter.autoscale")

DEFAULT_TEMPLATE = (
    sys.executable, "-m", "kvrouter", "engine", "sim", "--worker-id", "{name}",
    "--role", "{role}", "--pool", "{pool}", "--model", "{model}", "--router", "{router}",
    "--listen", "127.0.0.1:0",
)


@dataclass
class _Proc:
    name: str
    role: Role
    started_at: float
    proc: subprocess.Popen[bytes]


class LocalActuator:
    def __init__(self, workdir: Path, *, router: str, model: str = "default",
                 pool: str = "disaggregated", template: Sequence[str] = DEFAULT_TEMPLATE,
                 extra_args: Sequence[str] = (), grace_s: float = 10.0, prefix: str = "auto",
                 aggregated_pool: str = AGGREGATED_POOL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workdir = workdir
        self.fields = {"router": router, "model": model}
        self.pools = {Role.PREFILL: pool, Role.DECODE: pool, Role.AGGREGATED: aggregated_pool}
        self.template = list(template)
        self.extra_args = list(extra_args)
        self.grace_s = grace_s
        self.prefix = prefix
        self.clock = clock
        self._procs: dict[str, _Proc] = {}
        self._serial = itertools.count(1)
        try:
            self.command("check", Role.DECODE)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad command template {self.template!r}: {e!r}") from None

    def command(self, name: str, role: Role) -> list[str]:
        return [a.format(name=name, role=role.value, pool=self.pools[role], **self.fields)
                for a in self.template] + self.extra_args

    def _launch(self, name: str, role: Role) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(name, role)
        try:
            with (self.workdir / f"{name}.log").open("ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as e:
            raise ActuatorError(f"cannot start {name}: {cmd[0]}: {e}") from e
        self._procs[name] = _Proc(name, role, self.clock(), proc)
        log.info("worker started", extra={"worker": name, "role": role.value, "pid": proc.pid})

    async def workers(self) -> list[Launched]:
        for name, p in list(self._procs.items()):
            code = p.proc.poll()
            if code is not None:
                log.warning("worker exited", extra={"worker": name, "exit_code": code})
                del self._procs[name]
        return [Launched(p.name, p.role, p.started_at) for p in self._procs.values()]

    async def start(self, role: Role) -> str:
        name = f"{self.prefix}-{role.value}-{next(self._serial)}"
        self._launch(name, role)
        return name

    async def stop(self, name: str) -> None:
        p = self._procs.get(name)
        if p is None:
            return
        await self._terminate(p)
        del self._procs[name]

    async def _terminate(self, p: _Proc) -> None:
        if p.proc.poll() is not None:
            return
        try:
            os.killpg(p.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + self.grace_s
        while p.proc.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            await asyncio.to_thread(p.proc.wait, 5.0)

    async def set_role(self, name: str, role: Role) -> None:
        """A simulated engine takes its role on the command line: restart it as `role`
        under the same name (the router sees a new registration)."""
        p = self._procs.get(name)
        if p is None:
            raise ActuatorError(f"unknown worker {name!r}")
        await self._terminate(p)
        del self._procs[name]
        self._launch(name, role)

    async def close(self) -> None:
        """Stop every worker (the planner exits)."""
        for p in list(self._procs.values()):
            await self._terminate(p)
        self._procs.clear()
