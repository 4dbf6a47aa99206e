"""Actuators of the autoscaling planner and the loop's handling of their failures.

No Kubernetes API server runs here: the Kubernetes actuator talks to the official client,
whose transport (`ApiClient.call_api`) is replaced by a recorder answering JSON the way
an API server does; the client's own models serialise the requests and deserialise the
answers. The manifests are validated against the published schemas, and the RBAC Role is
checked to grant every call the actuator was seen to make.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client import rest
from prometheus_client import CollectorRegistry

from kvrouter.autoscale import Action, ActionKind, AutoscaleConfig, AutoscaleMetrics, Autoscaler, PerfModel
from kvrouter.autoscale.actuators import ActuatorError
from kvrouter.autoscale.actuators.kubernetes import DELETION_COST, KubernetesActuator
from kvrouter.autoscale.actuators.local import LocalActuator
from kvrouter.autoscale.loop import Counters, PlannerLoop, RouterTelemetry, parse_counters, quantile
from kvrouter.client import AsyncRouterClient
from kvrouter.engines.sim import EngineProfile
from kvrouter.registry import Role
from kvrouter.testing.wait import wait_until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
K8S_VERSION = "1.33"


# -- a recording API server ------------------------------------------------------------------

class _Urllib3Like:
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.reason = status, "OK" if status < 300 else "Error"
        self.data = json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}


class ApiServer:
    """Deployments' replicas and pods in memory; every request recorded as (method, path)."""

    def __init__(self) -> None:
        self.replicas = {"kvrouter-prefill": 1, "kvrouter-decode": 1, "kvrouter-aggregated": 0}
        self.pods: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: dict[str, int] = {}  # method -> status to answer
        self.delay_s = 0.0

    def pod(self, name: str, role: str, age_s: float = 10.0, terminating: bool = False) -> None:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age_s))
        md: dict[str, Any] = {"name": name, "creationTimestamp": created, "labels": {
            "app.kubernetes.io/name": "kvrouter-engine", "app.kubernetes.io/instance": "kvrouter",
            "app.kubernetes.io/component": role}}
        if terminating:
            md["deletionTimestamp"] = created
        self.pods[name] = {"apiVersion": "v1", "kind": "Pod", "metadata": md}

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None,
                 post_params: Any = None, _request_timeout: Any = None) -> rest.RESTResponse:
        path = re.sub(r"^https?://[^/]+", "", url).split("?")[0]
        self.calls.append((method, path, body))
        if self.delay_s:
            time.sleep(self.delay_s)
        if method in self.fail:
            resp = rest.RESTResponse(_Urllib3Like(self.fail[method], {
                "kind": "Status", "message": "refused", "code": self.fail[method]}))
            resp.read()
            return resp
        status, out = self._answer(method, path, body)
        resp = rest.RESTResponse(_Urllib3Like(status, out))
        resp.read()
        return resp

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        m = re.fullmatch(r"/apis/apps/v1/namespaces/(\w+)/deployments/([\w-]+)/scale", path)
        if m:
            name = m.group(2)
            if method == "PATCH":
                self.replicas[name] = int(body["spec"]["replicas"])
            return 200, {"apiVersion": "autoscaling/v1", "kind": "Scale",
                         "metadata": {"name": name}, "spec": {"replicas": self.replicas[name]}}
        if re.fullmatch(r"/api/v1/namespaces/\w+/pods", path):
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                         "items": list(self.pods.values())}
        m = re.fullmatch(r"/api/v1/namespaces/\w+/pods/([\w-]+)", path)
        if m:
            pod = self.pods.get(m.group(1))
            if pod is None:
                return 404, {"kind": "Status", "code": 404, "message": "not found"}
            if method == "PATCH":
                pod["metadata"].setdefault("annotations", {}).update(
                    body["metadata"]["annotations"])
            return 200, pod
        return 404, {"kind": "Status", "code": 404}


@pytest.fixture
def api() -> tuple[ApiServer, KubernetesActuator]:
    server = ApiServer()
    ac = k8s.ApiClient(k8s.Configuration())
    ac.call_api = server.call_api  # type: ignore[method-assign]
    return server, KubernetesActuator("kvrouter", "kvrouter", api_client=ac)


def test_kubernetes_start_stop_and_flip_scale_the_role_deployments(
        api: tuple[ApiServer, KubernetesActuator]) -> None:
    server, act = api
    server.pod("kvrouter-prefill-abc", "prefill")
    server.pod("kvrouter-decode-def", "decode")
    server.pod("kvrouter-decode-old", "decode", terminating=True)
    ws = asyncio.run(act.workers())
    assert {(w.name, w.role) for w in ws} == {("kvrouter-prefill-abc", Role.PREFILL),
                                               ("kvrouter-decode-def", Role.DECODE)}
    assert all(w.started_at <= time.monotonic() - 9 for w in ws)  # from the pod's age
    list_call = server.calls[0]
    assert list_call[0] == "GET" and list_call[1] == "/api/v1/namespaces/kvrouter/pods"

    asyncio.run(act.start(Role.DECODE))
    assert server.replicas["kvrouter-decode"] == 2
    server.calls.clear()
    asyncio.run(act.stop("kvrouter-prefill-abc"))
    assert [(m, p) for m, p, _ in server.calls] == [
        ("GET", "/api/v1/namespaces/kvrouter/pods/kvrouter-prefill-abc"),
        ("PATCH", "/api/v1/namespaces/kvrouter/pods/kvrouter-prefill-abc"),
        ("GET", "/apis/apps/v1/namespaces/kvrouter/deployments/kvrouter-prefill/scale"),
        ("PATCH", "/apis/apps/v1/namespaces/kvrouter/deployments/kvrouter-prefill/scale")]
    # the drained pod is the one its ReplicaSet removes
    ann = server.pods["kvrouter-prefill-abc"]["metadata"]["annotations"]
    assert ann == {DELETION_COST: "-1000"}
    assert server.replicas["kvrouter-prefill"] == 0
    asyncio.run(act.stop("gone-already"))  # not an error
    asyncio.run(act.set_role("kvrouter-decode-def", Role.PREFILL))
    assert server.replicas == {"kvrouter-prefill": 1, "kvrouter-decode": 1,
                               "kvrouter-aggregated": 0}


def test_kubernetes_api_errors_are_actuator_errors(
        api: tuple[ApiServer, KubernetesActuator]) -> None:
    server, act = api
    server.fail["PATCH"] = 409
    with pytest.raises(ActuatorError, match="409"):
        asyncio.run(act.start(Role.PREFILL))
    assert server.replicas["kvrouter-prefill"] == 1  # nothing changed
    server.fail = {"GET": 403}
    with pytest.raises(ActuatorError, match="403"):
        asyncio.run(act.workers())


def _loop(actuator: Any, **cfg: Any) -> tuple[PlannerLoop, CollectorRegistry]:
    reg = CollectorRegistry()
    scaler = Autoscaler(PerfModel(EngineProfile.load()), AutoscaleConfig(**cfg),
                        metrics=AutoscaleMetrics(reg))
    client = AsyncRouterClient("127.0.0.1:1")  # never called by apply()
    return PlannerLoop(scaler, RouterTelemetry(client, "http://127.0.0.1:1/metrics", "default",
                                               "disaggregated"), actuator, client), reg


def test_loop_retries_a_failing_then_hanging_actuator_with_timeouts(
        api: tuple[ApiServer, KubernetesActuator]) -> None:
    server, act = api
    start = Action(ActionKind.START, Role.PREFILL)

    async def run() -> tuple[bool, bool, float, bool, CollectorRegistry]:
        loop, reg = _loop(act, action_timeout_s=0.3, action_attempts=3)
        server.fail["PATCH"] = 500
        failed = await loop.apply(start)
        patches = [c for c in server.calls if c[0] == "PATCH"]
        assert len(patches) == 3  # every attempt, then given up
        server.fail = {}
        server.delay_s = 1.0  # hangs past the timeout on every call
        t0 = time.monotonic()
        hung = await loop.apply(start)
        took = time.monotonic() - t0
        server.delay_s = 0.0
        ok = await loop.apply(start)
        await loop.router.close()
        return failed, hung, took, ok, reg

    failed, hung, took, ok, reg = asyncio.run(run())
    assert failed is False
    lab = {"model": "default", "pool": "disaggregated", "action": "start", "outcome": "failed"}
    assert reg.get_sample_value("kvrouter_autoscale_actions_total", lab) == 2.0
    assert hung is False and took < 10  # bounded: attempts x timeout + backoff
    # a timed-out call may still land later (its thread runs on): the loop trusts the
    # actuator's list at the next tick, not its own bookkeeping
    assert ok is True


def test_manifests_validate_and_rbac_grants_every_call(
        api: tuple[ApiServer, KubernetesActuator]) -> None:
    docs = [d for f in ("planner.yaml", "planner-engines.yaml")
            for d in yaml.safe_load_all((DEPLOY / f).read_text())]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    role = next(d for d in docs if d["kind"] == "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    server, act = api
    server.pod("kvrouter-decode-x", "decode")
    asyncio.run(act.workers())
    asyncio.run(act.start(Role.PREFILL))
    asyncio.run(act.set_role("kvrouter-decode-x", Role.PREFILL))
    verb = {"GET": "get", "PATCH": "patch"}
    for method, path, _ in server.calls:
        if path.endswith("/pods"):
            need = ("", "pods", "list")
        elif "/pods/" in path:
            need = ("", "pods", verb[method])
        else:
            need = ("apps", "deployments/scale", verb[method])
        assert need in grants, need
    # the engine Deployments are what the actuator scales, labelled as it selects them
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for role_name in ("prefill", "decode", "aggregated"):
        d = deps[act.deployment(Role(role_name))]
        assert "replicas" not in d["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == role_name


# -- local -----------------------------------------------------------------------------------

SLEEPER = (sys.executable, "-c", "import sys, time; print(sys.argv[1:], flush=True); "
           "time.sleep(120)", "{name}", "{role}", "{router}")


def test_local_actuator_starts_lists_and_stops_processes(tmp_path: Path) -> None:
    async def run() -> None:
        act = LocalActuator(tmp_path, router="127.0.0.1:9", template=SLEEPER, grace_s=2.0)
        a = await act.start(Role.PREFILL)
        b = await act.start(Role.DECODE)
        assert {(w.name, w.role) for w in await act.workers()} == {(a, Role.PREFILL),
                                                                    (b, Role.DECODE)}
        wait_until(lambda: "127.0.0.1:9" in (tmp_path / f"{a}.log").read_text(), 20,
                   what="the template's fields on the command line")
        assert "'prefill'" in (tmp_path / f"{a}.log").read_text()
        await act.set_role(a, Role.DECODE)
        assert {w.role for w in await act.workers()} == {Role.DECODE}
        await act.stop(b)
        assert [w.name for w in await act.workers()] == [a]
        proc = act._procs[a].proc
        proc.kill()  # a worker that dies drops out of the list
        proc.wait()
        assert await act.workers() == []
        await act.close()

    asyncio.run(run())


def test_local_actuator_refuses_bad_templates_and_commands(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="template"):
        LocalActuator(tmp_path, router="x", template=("run", "{nope}"))
    act = LocalActuator(tmp_path, router="x", template=(str(tmp_path / "missing"), "{name}"))
    with pytest.raises(ActuatorError, match="cannot start"):
        asyncio.run(act.start(Role.PREFILL))
    assert asyncio.run(act.workers()) == []


# -- telemetry parsing -----------------------------------------------------------------------

def test_router_counters_parse_and_difference() -> None:
    from prometheus_client import generate_latest

    from kvrouter.server.metrics import RouterMetrics

    rm = RouterMetrics()  # the router's own metrics, as /metrics serves them
    rm.decided("m", "kv", 0.001, 0.0, prompt_tokens=3000, expected_output_tokens=100)
    rm.failed("m", "kv", "unavailable")
    before = parse_counters(generate_latest(rm.registry).decode(), "m", "disaggregated")
    for ttft in (0.2, 0.8, 0.9, 0.95, 5.0):
        rm.generated("m", "disaggregated", 2000, 50, ttft, 0.98)  # ITL 20 ms
    rm.generated("m", "long-context", 99, 9, 0.1, 0.1)  # a pool this planner does not size
    after = parse_counters(generate_latest(rm.registry).decode(), "m", "disaggregated")
    assert (after.requests, after.prompt_tokens, after.output_tokens) == (6, 13000, 350)
    d = after.minus(before)
    assert d is not None and (d.requests, d.prompt_tokens, d.output_tokens) == (5, 10000, 250)
    # 1 of 5 below 0.75 s, 3 in (0.75, 1]: the median is halfway through that bucket
    assert quantile(d.ttft, 0.5) == pytest.approx(0.875)
    assert quantile(d.itl, 0.95) == pytest.approx(0.02, abs=1e-3)
    assert quantile((), 0.95) is None
    assert after.minus(Counters(20, 0, 0)) is None  # went back: a restarted router
