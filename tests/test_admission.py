"""Admission control (docs/admission.md): the queue's rules in-process, and the router's
Route / RouteStream / Generate paths over real gRPC with a router process (and simulated
engine processes for Generate): waiting, deadlines, overflow, bad input, no leaked load."""

from __future__ import annotations

import math
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.admission import AdmissionQueue, Refused
from kvrouter.client import RouterClient
from kvrouter.config import AdmissionConfig, ConfigError, ModelConfig
from kvrouter.testing.processes import child_env, kvrouter_cmd
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import Engines, prompt, wait_routable

BS = 16


# ---------------------------------------------------------------------- the queue in-process
def _queue(**kw: Any) -> AdmissionQueue[str]:
    return AdmissionQueue(AdmissionConfig(enabled=True, **kw))


def test_higher_class_first_and_tenants_by_weight() -> None:
    q = _queue(tenant_weights={"a": 1.0, "b": 3.0})
    for i in range(200):
        q.push(f"a{i}", 2, "a", 0.0)
        q.push(f"b{i}", 2, "b", 0.0)
    q.push("urgent", 0, "a", 1.0)
    first = q.pop(1.0)
    assert first is not None and first.item == "urgent"
    served = Counter(t.tenant for t in (q.pop(2.0) for _ in range(200)) if t is not None)
    assert served == {"a": 50, "b": 150}  # 1:3 by weight though both sent alike
    assert len(q) == 200 and q.counts.dispatched == 201


def test_unknown_class_gets_default_and_is_counted() -> None:
    q = _queue()
    assert q.classes[q.resolve_class("platinum")] == "normal"
    assert q.classes[q.resolve_class("")] == "normal"
    assert q.classes[q.resolve_class("low")] == "low"
    assert q.counts.unknown_class == 1


def test_deadlines_expire_and_past_deadline_refused() -> None:
    q = _queue()
    t1, _ = q.push("x", 1, "t", now=0.0, deadline=5.0)
    q.push("y", 1, "t", now=0.0)
    assert q.expire(4.9) == []
    assert [t.item for t in q.expire(5.0)] == ["x"] and t1.done
    assert len(q) == 1 and q.counts.expired == 1
    with pytest.raises(Refused) as e:
        q.push("z", 1, "t", now=10.0, deadline=9.0)
    assert e.value.reason == "deadline_passed" and len(q) == 1


def test_full_queue_sheds_lower_class_or_refuses_with_retry_after() -> None:
    q = _queue(max_queue=2)
    q.push("low1", 2, "t", 0.0)
    q.push("low2", 2, "t", 0.0)
    _, shed = q.push("high", 0, "t", 0.0)
    assert shed is not None and shed.item == "low2" and q.counts.shed == 1
    with pytest.raises(Refused) as e:
        q.push("low3", 2, "t", 0.0)
    assert e.value.reason == "queue_full" and e.value.retry_after_s is not None
    assert e.value.retry_after_s >= 1.0 and len(q) == 2 and q.counts.rejected == 1


def test_bad_names_and_config() -> None:
    with pytest.raises(ValueError):
        AdmissionQueue.check_tenant("has space")
    with pytest.raises(ValueError):
        AdmissionQueue.check_priority("x" * 65)
    assert AdmissionQueue.check_tenant("") == "default"
    with pytest.raises(ValueError):
        ModelConfig(name="m", admission={"default_class": "gold"})
    with pytest.raises(ValueError):
        ModelConfig(name="m", admission={"classes": ["a", "a"], "default_class": "a"})
    with pytest.raises(ValueError):
        ModelConfig(name="m", admission={"tenant_weights": {"a": 0}})
    assert isinstance(ConfigError("x"), ValueError)


# ---------------------------------------------------------------------- the router over gRPC
def _config(**admission: Any) -> dict[str, Any]:
    adm = {"enabled": True, "max_running_requests": 1, "max_queue": 4, **admission}
    return {"router": {"heartbeat_timeout_s": 0, "lease_s": 60},
            "models": [{"name": "default", "block_size": BS, "vocab_size": 32000,
                        "admission": adm}]}


@pytest.fixture()
def router(router_server: Callable[..., Any]) -> Iterator[tuple[Any, Any]]:
    """A router whose one worker is saturated by one request in flight."""
    r = router_server(_config())
    with grpc.insecure_channel(r.target) as ch, RouterClient(r.target) as c:
        c.register_worker("default", "w0", block_size=BS)
        yield r, router_pb2_grpc.RouterStub(ch)


def _route(n: int, **kw: Any) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(token_ids=prompt(n, 64), **kw)


def _admission(stub: Any) -> router_pb2.AdmissionState:
    return stub.ListWorkers(router_pb2.ListWorkersRequest()).admission[0]


def _reserved(stub: Any) -> int:
    return sum(w.load.reserved_requests
               for w in stub.ListWorkers(router_pb2.ListWorkersRequest()).workers)


def test_route_waits_until_release_then_routes(router: tuple[Any, Any]) -> None:
    r, stub = router
    first = stub.Route(_route(1))
    waiting = stub.Route.future(_route(2, tenant="acme", priority="high"), timeout=30)
    wait_until(lambda: _admission(stub).queued == 1, 10, what="request queued")
    st = _admission(stub)
    assert st.enabled and st.saturated and [c.queued for c in st.classes] == [1, 0, 0]
    assert not waiting.done()
    out = subprocess.run(kvrouter_cmd("workers", "--target", r.target), capture_output=True,
                         text=True, timeout=60, env=child_env(), check=True).stdout
    assert "admission default: saturated, 1/4 queued (high 1, normal 0, low 0)" in out
    stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
    second = waiting.result()
    assert second.worker == "w0" and _admission(stub).dispatched == 1
    stub.Release(router_pb2.ReleaseRequest(request_id=second.request_id))
    assert _reserved(stub) == 0 and _admission(stub).queued == 0


def test_deadlines_while_waiting_and_already_past(router: tuple[Any, Any]) -> None:
    _, stub = router
    first = stub.Route(_route(1))
    soon = int((time.time() + 0.3) * 1e3)
    with pytest.raises(grpc.RpcError) as e:
        stub.Route(_route(2, deadline_unix_ms=soon), timeout=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in (e.value.details() or "")
    past = int((time.time() - 5) * 1e3)
    with pytest.raises(grpc.RpcError) as e:
        stub.Route(_route(3, deadline_unix_ms=past))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st = _admission(stub)
    assert st.queued == 0 and st.expired == 2
    stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
    assert _reserved(stub) == 0  # the expired requests reserved nothing


def test_full_queue_is_resource_exhausted_with_retry_after(router_server: Callable[..., Any],
                                                          ) -> None:
    r = router_server(_config(max_queue=1), metrics=True)
    with grpc.insecure_channel(r.target) as ch, RouterClient(r.target) as c:
        c.register_worker("default", "w0", block_size=BS)
        stub = router_pb2_grpc.RouterStub(ch)
        first = stub.Route(_route(1))
        waiting = stub.Route.future(_route(2), timeout=30)
        wait_until(lambda: _admission(stub).queued == 1, 10, what="request queued")
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(_route(3))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        md = dict(e.value.trailing_metadata() or ())
        assert int(md["retry-after"]) >= 1
        # a stream item cannot wait: refused the same way, the stream goes on
        reply = next(iter(stub.RouteStream(iter([router_pb2.RouteStreamRequest(
            seq=7, items=[router_pb2.RouteStreamItem(route=_route(4))])]))))
        assert reply.results[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
        second = waiting.result()
        stub.Release(router_pb2.ReleaseRequest(request_id=second.request_id))
        st = _admission(stub)
        assert st.rejected == 2 and st.queued == 0 and _reserved(stub) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics") as page:
            text = page.read().decode()
        assert 'kvrouter_admission_total{class="normal",model="default",outcome="queue_full"} 1.0' in text
        assert 'kvrouter_admission_queued{class="normal",model="default"} 0.0' in text


def test_bad_admission_input_is_invalid_argument(router: tuple[Any, Any]) -> None:
    _, stub = router
    for kw in ({"tenant": "two words"}, {"priority": "p" * 100}, {"deadline_unix_ms": -1}):
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(_route(1, **kw))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
    assert _reserved(stub) == 0 and _admission(stub).queued == 0
    # an unknown class is not an error: the default class, counted in the metrics
    rep = stub.Route(_route(1, priority="platinum"))
    stub.Release(router_pb2.ReleaseRequest(request_id=rep.request_id))


def test_cancelled_waiter_leaves_the_queue(router: tuple[Any, Any]) -> None:
    _, stub = router
    first = stub.Route(_route(1))
    waiting = stub.Route.future(_route(2), timeout=30)
    wait_until(lambda: _admission(stub).queued == 1, 10, what="request queued")
    waiting.cancel()
    wait_until(lambda: _admission(stub).queued == 0, 10, what="cancelled waiter gone")
    stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
    assert _reserved(stub) == 0


def test_generate_waits_for_capacity_on_sim_engines(router_server: Callable[..., Any],
                                                    tmp_path: Any) -> None:
    """Three concurrent Generates on one engine, one request in flight at a time: all
    finish, two after waiting, and no load is left reserved."""
    cfg = _config()
    cfg["router"]["heartbeat_timeout_s"] = 30.0
    r = router_server(cfg)
    engines = Engines(tmp_path / "engines", r.target)
    engines.workdir.mkdir(parents=True, exist_ok=True)
    try:
        engines.start("aggregated", name="e0")
        wait_routable(r.target, {"e0"})
        with grpc.insecure_channel(r.target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)

            def call(i: int) -> Any:
                req = router_pb2.RouterGenerateRequest(
                    token_ids=prompt(100 + i, 200), request_id=f"g{i}",
                    sampling=common_pb2.SamplingParams(max_tokens=16))
                return stub.Generate(req, timeout=60,
                                     metadata=((("x-kvrouter-tenant", f"t{i % 2}"),)))

            calls = [call(i) for i in range(3)]
            outs = [[t for resp in c for t in resp.token_ids] for c in calls]
            assert all(len(o) == 16 for o in outs)
            wait_until(lambda: _reserved(stub) == 0, 10, what="no reservation left")
            st = _admission(stub)
            assert st.admitted + st.dispatched == 3 and st.dispatched >= 1
            assert st.queued == 0 and not math.isnan(st.retry_after_s)
    finally:
        engines.stop_all()


def test_higher_class_sheds_lower_from_full_queue(router_server: Callable[..., Any]) -> None:
    r = router_server(_config(max_queue=1))
    with grpc.insecure_channel(r.target) as ch, RouterClient(r.target) as c:
        c.register_worker("default", "w0", block_size=BS)
        stub = router_pb2_grpc.RouterStub(ch)
        first = stub.Route(_route(1))
        low = stub.Route.future(_route(2, priority="low", tenant="newcomer"), timeout=30)
        wait_until(lambda: _admission(stub).queued == 1, 10, what="low request queued")
        high = stub.Route.future(_route(3, priority="high"), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            low.result()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "shed" in (e.value.details() or "")
        assert [k.queued for k in _admission(stub).classes] == [1, 0, 0]
        stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
        stub.Release(router_pb2.ReleaseRequest(request_id=high.result().request_id))
        assert _reserved(stub) == 0 and _admission(stub).rejected == 1


def test_kv_usage_from_heartbeats_holds_and_frees_the_queue(
        router_server: Callable[..., Any]) -> None:
    """A worker reporting 95% of its KV in use is saturated (max_kv_usage 0.9); its next
    report frees the waiting request; a report without capacity (0 used, 0 free) is
    not judged on KV usage at all."""
    r = router_server(_config(max_running_requests=100, max_kv_usage=0.9))
    with grpc.insecure_channel(r.target) as ch, RouterClient(r.target) as c:
        c.register_worker("default", "w0", block_size=BS)
        stub = router_pb2_grpc.RouterStub(ch)

        def report(used: int, free: int) -> None:
            c.heartbeat("default", "w0", common_pb2.LoadReport(kv_used_blocks=used,
                                                               kv_free_blocks=free))
            wait_until(lambda: stub.ListWorkers(router_pb2.ListWorkersRequest()).workers[0]
                       .load.reported.kv_used_blocks == used, 10, what="report applied")

        report(95, 5)
        waiting = stub.Route.future(_route(1), timeout=30)
        wait_until(lambda: _admission(stub).queued == 1, 10, what="request queued")
        report(10, 90)
        first = waiting.result()
        report(0, 0)
        second = stub.Route(_route(2))  # no capacity reported: routed at once
        for rep in (first, second):
            stub.Release(router_pb2.ReleaseRequest(request_id=rep.request_id))
        st = _admission(stub)
        assert st.dispatched == 1 and st.admitted == 1 and _reserved(stub) == 0


def test_http_front_answers_429_with_retry_after(router_server: Callable[..., Any]) -> None:
    """max_queue 0: a saturated model refuses at once; over the HTTP front that is 429 with
    Retry-After, and nothing is reserved for the refused request."""
    import httpx

    from kvrouter.testing.processes import free_port

    port = free_port()
    cfg = _config(max_queue=0)
    cfg["router"]["http"] = f"127.0.0.1:{port}"
    r = router_server(cfg)
    with grpc.insecure_channel(r.target) as ch, RouterClient(r.target) as c:
        c.register_worker("default", "w0", block_size=BS)
        stub = router_pb2_grpc.RouterStub(ch)
        first = stub.Route(_route(1))
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"model": "default", "prompt": prompt(5, 40), "max_tokens": 4})
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert _reserved(stub) == 1  # only the Route's
        stub.Release(router_pb2.ReleaseRequest(request_id=first.request_id))
        assert _reserved(stub) == 0 and _admission(stub).rejected == 1
