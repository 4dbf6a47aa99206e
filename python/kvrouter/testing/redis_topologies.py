"""Real Redis topologies on loopback for tests and benches: a primary with a replica
watched by Sentinel, a three-primary Cluster, and a TLS-only server.

Each is made of plain `redis-server` processes (no persistence) started here and
stopped by `stop()`; the URL each returns is what a router or a publisher is given
(`redis+sentinel://...`, `redis+cluster://...`, `rediss://...`), parsed by
kvrouter.events.redis_conn.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from kvrouter.testing.processes import ChildProcess, free_port
from kvrouter.testing.wait import wait_until


def _command(port: int, *args: str, tls: bool = False) -> bytes:
    """One inline command to a plain-text Redis port; returns the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        s.settimeout(2)
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _info(port: int, section: str) -> dict[str, str]:
    reply = _command(port, "INFO", section).decode(errors="replace")
    out: dict[str, str] = {}
    for line in reply.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _redis(name: str, port: int, log_dir: Path, *args: str) -> ChildProcess:
    # --dir: a replica's full sync makes the primary write an RDB file there (not the cwd).
    return ChildProcess(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--daemonize", "no",
                               "--dir", str(log_dir), *args],
                        log_dir / f"{name}.log", None).start()


def _cluster_port() -> int:
    """A free port a cluster node may take: Redis listens for the cluster bus on port + 10000,
    so the port must be at most 55535 and its bus port free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a Redis cluster node")


def _pings(port: int) -> bool:
    return _command(port, "PING").startswith(b"+PONG")


class _Servers:
    """Servers a test starts; `start` stops what did start when any step fails."""

    default_timeout = 20.0

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> Self:
        try:
            self._start(self.default_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        return self


@dataclass
class SentinelSetup(_Servers):
    """A primary, one replica and one Sentinel (quorum 1) that fails over in ~1-3 s."""

    log_dir: Path
    service: str = "kvrouter"
    primary_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_port: int = field(default_factory=free_port)
    procs: dict[str, ChildProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"

    default_timeout = 30.0

    def _start(self, timeout: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs["primary"] = _redis("redis-primary", self.primary_port, self.log_dir)
        self.procs["replica"] = _redis("redis-replica", self.replica_port, self.log_dir,
                                       "--replicaof", "127.0.0.1", str(self.primary_port))
        conf = self.log_dir / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 500\n"
            f"sentinel failover-timeout {self.service} 4000\n")
        self.procs["sentinel"] = ChildProcess(
            "redis-sentinel", ["redis-server", str(conf), "--sentinel"],
            self.log_dir / "sentinel.log", None).start()
        procs = list(self.procs.values())
        wait_until(lambda: _info(self.replica_port, "replication").get("master_link_status") == "up",
                   timeout, what="replica in sync", procs=procs, ignore=(OSError,))
        # Sentinel learns the replica from the primary's INFO; failover needs it known.
        wait_until(lambda: f"{self.replica_port}".encode() in _command(
            self.sentinel_port, "SENTINEL", "REPLICAS", self.service),
            timeout, what="sentinel sees the replica", procs=procs, ignore=(OSError,))

    def primary(self) -> int:
        """The port Sentinel names as primary now."""
        reply = _command(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(reply.split(b"\r\n")[-2])

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns the port it had."""
        port = self.primary()
        name = "primary" if port == self.primary_port else "replica"
        self.procs[name].kill()
        return port

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()


@dataclass
class ClusterSetup(_Servers):
    """Three primaries (no replicas) with all 16384 slots assigned."""

    log_dir: Path
    ports: list[int] = field(default_factory=lambda: [_cluster_port() for _ in range(3)])
    procs: list[ChildProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    default_timeout = 30.0

    def _start(self, timeout: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            self.procs.append(_redis(
                f"redis-cluster-{port}", port, self.log_dir, "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.log_dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000"))
        for port in self.ports:
            wait_until(lambda p=port: _pings(p), timeout, what=f"cluster node {port}",  # type: ignore[misc]
                       procs=self.procs, ignore=(OSError,))
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        for port in self.ports:
            wait_until(lambda p=port: _info(p, "cluster").get("cluster_enabled") == "1"  # type: ignore[misc]
                       and b"cluster_state:ok" in _command(p, "CLUSTER", "INFO"),
                       timeout, what=f"cluster state ok on {port}", procs=self.procs, ignore=(OSError,))

    def keys_per_node(self) -> list[int]:
        return [int(_command(p, "DBSIZE").strip(b":\r\n") or 0) for p in self.ports]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()


@dataclass
class TlsRedis(_Servers):
    """A redis-server that accepts TLS only (`port 0`), with client certificates
    optional; the CA, certificate and key are files the caller made."""

    log_dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    port: int = field(default_factory=free_port)
    proc: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    default_timeout = 20.0

    def _start(self, timeout: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = ChildProcess("redis-tls", [
            "redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "optional",
            "--save", "", "--appendonly", "no", "--daemonize", "no"],
            self.log_dir / "redis-tls.log", None).start()

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, timeout, what="TLS redis-server", procs=[self.proc], ignore=(OSError,))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
