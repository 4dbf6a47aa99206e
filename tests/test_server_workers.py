"""Worker lifecycle over gRPC, liveness, health/reflection/metrics and the CLI, against a
real `kvrouter serve` subprocess."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvrouter.client import RouterClient, load_report
from kvrouter.testing.wait import wait_until

BS = 4
MODEL = "m"
PROMPT = list(range(100, 132))


def _config(**router: Any) -> dict[str, Any]:
    # These workers never heartbeat: liveness is off unless a test turns it on.
    router.setdefault("heartbeat_timeout_s", 0)
    return {"router": router, "models": [{"name": MODEL, "block_size": BS}]}


def _status(c: RouterClient, name: str) -> str:
    return {w.name: w.status for w in c.list_workers(MODEL)}[name]


def test_register_drain_deregister(router_server: Any, store_blocks: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        resp = c.register_worker(MODEL, "a", address="127.0.0.1:7001", block_size=2 * BS,
                                 metadata={"gpu": "h100"})
        assert (resp.status, resp.block_size) == ("up", BS) and resp.heartbeat_interval_s > 0
        c.register_worker(MODEL, "b", block_size=BS)
        store_blocks(c, MODEL, "a", PROMPT, BS)
        d = c.route(PROMPT, MODEL, dry_run=True)
        assert (d.worker, d.address) == ("a", "127.0.0.1:7001")
        held = c.route(PROMPT, MODEL, candidates=["a"])

        # Draining: no new requests, reservations stay until released.
        assert c.drain_worker(MODEL, "a") == 1
        w = {w.name: w for w in c.list_workers(MODEL)}["a"]
        assert (w.status, w.routable, w.metadata["gpu"]) == ("draining", False, "h100")
        assert c.route(PROMPT, MODEL, dry_run=True).worker == "b"
        with pytest.raises(grpc.RpcError) as e:
            c.route(PROMPT, MODEL, candidates=["a"])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no routable worker" in (e.value.details() or "")

        # Deregister drops its index entries and reservations.
        assert c.deregister_worker(MODEL, "a") == 1
        assert [w.name for w in c.list_workers(MODEL)] == ["b"]
        assert not c.release(held.request_id, MODEL)
        assert c.list_models()[0].indexed_blocks == 0

        # Registering again makes it routable, with an empty cache.
        c.register_worker(MODEL, "a", block_size=BS)
        assert _status(c, "a") == "up"
        assert c.route(PROMPT, MODEL, explain=True, dry_run=True).overlap_blocks == 0


def test_block_size_mismatch_is_not_routable(router_server: Any) -> None:
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        resp = c.register_worker(MODEL, "odd", block_size=6)
        assert resp.status == "mismatch" and "not a multiple" in resp.status_reason
        with pytest.raises(grpc.RpcError) as e:
            c.route(PROMPT, MODEL)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "1 registered, 0 up" in (e.value.details() or "")
        c.register_worker(MODEL, "odd", block_size=8)  # fixed engine config
        assert c.route(PROMPT, MODEL, dry_run=True).worker == "odd"


def test_heartbeat_lapse_removes_worker_until_it_registers_again(router_server: Any,
                                                                  store_blocks: Any) -> None:
    rp = router_server(_config(heartbeat_timeout_s=1.0))
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "w", block_size=BS)
        c.register_worker(MODEL, "steady", block_size=BS)
        store_blocks(c, MODEL, "w", PROMPT, BS)
        assert c.heartbeat(MODEL, "w", load_report(running=3, queued=2, kv_used_blocks=10,
                                                   kv_free_blocks=90)) == "up"
        wait_until(lambda: {w.name: w.reported_running for w in c.list_workers(MODEL)}["w"] == 3,
                   20, what="w's reported running count is 3")
        w = {w.name: w for w in c.list_workers(MODEL)}["w"]
        assert w.reported_queued == 2

        # "steady" keeps heartbeating, "w" goes silent and is removed with its cache.
        def silent_w_gone() -> bool:
            c.heartbeat(MODEL, "steady")
            return "w" not in {w.name for w in c.list_workers(MODEL)}

        wait_until(silent_w_gone, 20, what="silent worker w removed")
        assert {w.name for w in c.list_workers(MODEL)} == {"steady"}
        assert c.list_models()[0].indexed_blocks == 0
        with pytest.raises(grpc.RpcError) as e:
            c.heartbeat(MODEL, "w")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        c.register_worker(MODEL, "w", block_size=BS)
        assert _status(c, "w") == "up"
        assert c.route(PROMPT, MODEL, dry_run=True, candidates=["w"]).worker == "w"


def test_health_reflection_and_metrics(router_server: Any) -> None:
    rp = router_server(_config(), metrics=True)
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "w", block_size=BS)
        d = c.route(PROMPT, MODEL)
        c.route(PROMPT, MODEL, dry_run=True)
        with pytest.raises(grpc.RpcError):
            c.route([], MODEL)

        health = health_pb2_grpc.HealthStub(c.channel)
        for service in ("", "kvrouter.v1.Router"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        names = {s.name for r in refl.ServerReflectionInfo(iter([req]), timeout=5)
                 for s in r.list_services_response.service}
        assert {"kvrouter.v1.Router", "grpc.health.v1.Health"} <= names

        # The per-worker gauges come from a periodic snapshot.
        def scrape() -> str:
            url = f"http://127.0.0.1:{rp.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        wait_until(lambda: 'kvrouter_worker_reserved_requests{model="m",worker="w"} 1.0' in scrape(),
                   20, what="reserved-requests gauge at 1 on /metrics")
        text = scrape()
        assert 'kvrouter_decisions_total{model="m",outcome="routed",policy="kv"} 2.0' in text
        assert ('kvrouter_decisions_total{model="m",outcome="invalid_argument",policy="kv"} 1.0'
                in text)
        assert 'kvrouter_decision_seconds_count{model="m"} 2.0' in text
        assert 'kvrouter_predicted_overlap_ratio_count{model="m"} 2.0' in text
        assert 'kvrouter_workers{model="m",status="up"} 1.0' in text
        c.release(d.request_id, MODEL)


def test_cli_route_and_workers(router_server: Any, store_blocks: Any, kvrouter_cli: Any) -> None:
    _cli = kvrouter_cli
    rp = router_server(_config())
    with RouterClient(rp.target) as c:
        c.register_worker(MODEL, "warm", block_size=BS)
        c.register_worker(MODEL, "cold", block_size=BS)
        store_blocks(c, MODEL, "warm", PROMPT, BS)

    tokens = ",".join(map(str, PROMPT))
    out = _cli("route", "--target", rp.target, "--model", MODEL, "--tokens", tokens)
    assert out.returncode == 0, out.stderr
    assert "chosen warm" in out.stdout and "8/8 blocks" in out.stdout
    assert "new_prefill" in out.stdout and "cold" in out.stdout

    out = _cli("route", "--target", rp.target, "--model", MODEL, "--tokens", tokens,
               "--reserve", "--json")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["worker"] == "warm" and decision["request_id"]

    out = _cli("workers", "--target", rp.target)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "worker", "role", "status"]
    assert any(line.split()[:2] == ["m", "warm"] for line in lines)

    out = _cli("workers", "--target", rp.target, "--json")
    workers = {w["name"]: w for w in json.loads(out.stdout)}
    assert workers["warm"]["reserved_requests"] == 1 and workers["warm"]["cached_blocks"] == 8

    out = _cli("route", "--target", rp.target, "--model", "nope", "--random", "16")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "'nope'" in out.stderr


@pytest.mark.parametrize("args", [(), ("serve",), ("route",), ("workers",)])
def test_cli_help(args: tuple[str, ...], kvrouter_cli: Any) -> None:
    _cli = kvrouter_cli
    out = _cli(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: kvrouter" in out.stdout


def test_serve_rejects_bad_config_naming_the_field(tmp_path: Any, kvrouter_cli: Any) -> None:
    _cli = kvrouter_cli
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("router:\n  lease_s: -1\nmodels:\n  - name: x\n    block_size: 0\n")
    out = _cli("serve", "--config", str(cfg), timeout=30)
    assert out.returncode == 2
    assert "router.lease_s" in out.stderr and "models[0].block_size" in out.stderr


def test_serve_reports_port_in_use(router_server: Any, kvrouter_cli: Any) -> None:
    _cli = kvrouter_cli
    rp = router_server(_config())
    out = _cli("serve", "--listen", rp.target, "--metrics-port", "0", timeout=30)
    assert out.returncode == 1
    assert f"cannot listen on {rp.target}" in out.stderr
