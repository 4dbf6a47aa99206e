"""deploy/k8s/gateway/: the endpoint-picker manifests (docs/gateway.md).

The Kubernetes kinds are validated against the published Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail). InferencePool and HTTPRoute are checked
against the v1 APIs' required fields and against each other (the pool's endpointPickerRef
must be the picker's Service and port, the route's backendRef the pool, the router config's
ext_proc listener the container port the probes and the Service use).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvrouter.cli import build_parser
from kvrouter.config import load_config

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "gateway" / "kvrouter-epp.yaml"
K8S_VERSION = "1.33"


def docs() -> dict[str, dict[str, Any]]:
    out = {}
    for d in yaml.safe_load_all(MANIFEST.read_text()):
        assert d["kind"] not in out, f"two {d['kind']}s"
        out[d["kind"]] = d
    return out


def test_manifest_holds_the_picker_and_the_gateway_resources() -> None:
    assert set(docs()) == {"ConfigMap", "Deployment", "Service", "NetworkPolicy",
                           "InferencePool", "HTTPRoute"}


@pytest.mark.parametrize("kind", ["ConfigMap", "Deployment", "Service", "NetworkPolicy"])
def test_kubernetes_kinds_validate_against_the_published_schemas(kind: str) -> None:
    kubernetes_validate.validate(docs()[kind], K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_wrong_field() -> None:
    bad = copy.deepcopy(docs()["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _container() -> dict[str, Any]:
    return docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_router_config_and_command_line_agree_with_ports_and_probes(tmp_path: Path) -> None:
    d = docs()
    cfg_file = tmp_path / "router.yaml"
    cfg_file.write_text(d["ConfigMap"]["data"]["router.yaml"])
    cfg = load_config(cfg_file, env={})
    assert cfg.router.ext_proc == "0.0.0.0:9002"
    args = build_parser(_container()["args"]).parse_args(_container()["args"])
    assert args.ext_proc == cfg.router.ext_proc
    port = int(cfg.router.ext_proc.rsplit(":", 1)[1])
    c = _container()
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named["grpc-ext-proc"] == port
    # the protocol's health services, on the picker's port
    assert c["readinessProbe"]["grpc"] == {"port": port, "service": "readiness"}
    assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}
    # every model's tokenizer is mounted
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for m in cfg.models:
        assert m.tokenizer in mounts


def test_inference_pool_points_at_the_picker_service() -> None:
    d = docs()
    pool = d["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert {"selector", "targetPorts", "endpointPickerRef"} <= set(spec)  # required in v1
    assert spec["selector"]["matchLabels"]
    assert all(1 <= p["number"] <= 65535 for p in spec["targetPorts"])
    ref = spec["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["failureMode"] in ("FailOpen",
                                                                             "FailClose")
    svc = d["Service"]
    assert ref["name"] == svc["metadata"]["name"]
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert ref["port"]["number"] in ports  # v1 requires the port for a Service
    port = ports[ref["port"]["number"]]
    assert port["appProtocol"] == "kubernetes.io/h2c"  # ext_proc is gRPC: HTTP/2 cleartext
    assert port["targetPort"] == "grpc-ext-proc"
    assert svc["spec"]["selector"] == d["Deployment"]["spec"]["template"]["metadata"]["labels"]


def test_http_route_sends_to_the_pool() -> None:
    d = docs()
    route = d["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert refs == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                     "name": d["InferencePool"]["metadata"]["name"]}]
    assert route["spec"]["parentRefs"][0]["kind"] == "Gateway"


def test_network_policy_admits_the_gateway_to_the_picker_port() -> None:
    d = docs()
    pol = d["NetworkPolicy"]["spec"]
    assert pol["podSelector"]["matchLabels"] == d["Deployment"]["spec"]["selector"]["matchLabels"]
    ports = {p["port"] for rule in pol["ingress"] for p in rule["ports"]}
    assert {9002, 50051, 9400} <= ports
