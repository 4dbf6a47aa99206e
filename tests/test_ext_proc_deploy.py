"""deploy/k8s/gateway/: the endpoint-picker manifests (docs/gateway.md).

The Kubernetes kinds are validated against the published Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) and deserialised into the official
`kubernetes` client's models (V1Deployment, V1Service, ...: types and required fields;
a field the models do not know fails the round trip). InferencePool and HTTPRoute are
validated with jsonschema against the fields of the published v1 CRDs that the manifest
uses (tests/gateway_crd_schemas.py: types, required fields, enums, patterns, bounds, list
limits, the CEL rules on those fields; upstream paths and commits cited there), with
negative cases showing that the schema refuses a wrong manifest. The resources are also
checked against each other (the pool's endpointPickerRef must be the picker's Service and
port, the route's backendRef the pool, the router config's ext_proc listener the container
port the probes and the Service use).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from kvrouter.cli import build_parser
from kvrouter.config import load_config
from tests.gateway_crd_schemas import SCHEMAS

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


# ------------------------------------------------------------ the kubernetes client's models
MODELS = {"ConfigMap": "V1ConfigMap", "Deployment": "V1Deployment", "Service": "V1Service",
          "NetworkPolicy": "V1NetworkPolicy"}


def _unknown(doc: Any, back: Any, path: str = "") -> list[str]:
    """Paths of `doc` that the model's serialisation lost (fields the model does not know)."""
    if isinstance(doc, dict):
        if not isinstance(back, dict):
            return [path or "."]
        return [q for k, v in doc.items()
                for q in ([f"{path}.{k}"] if k not in back else _unknown(v, back[k], f"{path}.{k}"))]
    if isinstance(doc, list):
        if not isinstance(back, list) or len(back) != len(doc):
            return [path or "."]
        return [q for i, (a, b) in enumerate(zip(doc, back, strict=True))
                for q in _unknown(a, b, f"{path}[{i}]")]
    return [] if doc == back else [path or "."]


def _client_model_check(doc: dict[str, Any], kind: str) -> None:
    """Deserialise into the client's model (pydantic: wrong types and missing required
    fields raise); what it drops on the way back is a field it does not know."""
    api = ApiClient()
    obj = api.deserialize(json.dumps(doc), MODELS[kind], "application/json")
    assert type(obj).__name__ == MODELS[kind]
    lost = _unknown(doc, api.sanitize_for_serialization(obj))
    if lost:
        raise ValueError(f"{kind}: fields the {MODELS[kind]} model does not know: {lost}")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_kubernetes_kinds_deserialise_into_the_client_models(kind: str) -> None:
    _client_model_check(docs()[kind], kind)


def _container_of(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("kind, break_it, error", [
    ("Deployment", lambda d: _container_of(d).update(imagePullPolice="Always"), "imagePullPolice"),
    ("Deployment", lambda d: d["spec"].update(replicas="two"), "replicas"),
    ("Deployment", lambda d: _container_of(d).pop("name"), "name"),
    ("Service", lambda d: d["spec"]["ports"][0].update(port="9002"), "port"),
    ("Service", lambda d: d["spec"].update(selectr={"a": "b"}), "selectr"),
])
def test_the_client_models_refuse_a_wrong_manifest(kind: str, break_it: Callable[[Any], Any],
                                                   error: str) -> None:
    bad = copy.deepcopy(docs()[kind])
    break_it(bad)
    with pytest.raises(ValueError, match=error):  # pydantic's ValidationError is a ValueError
        _client_model_check(bad, kind)


# ------------------------------------------------------------ the Gateway API CRDs
def _crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = SCHEMAS[doc["kind"]]
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '.'}: {e.validator}: {e.message}"
            for e in v.iter_errors(doc)]


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_gateway_kinds_validate_against_the_crd_schemas(kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[kind])
    assert _crd_errors(docs()[kind]) == []


def _pool_spec(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]


def _rule(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["rules"][0]


@pytest.mark.parametrize("kind, break_it, where, validator", [
    # wrong type, out of range, too many items
    ("InferencePool", lambda d: _pool_spec(d)["targetPorts"][0].update(number="8000"),
     "spec.targetPorts.0.number", "type"),
    ("InferencePool", lambda d: _pool_spec(d)["targetPorts"][0].update(number=70000),
     "spec.targetPorts.0.number", "maximum"),
    ("InferencePool", lambda d: _pool_spec(d)["endpointPickerRef"]["port"].update(number=0),
     "spec.endpointPickerRef.port.number", "minimum"),
    ("InferencePool", lambda d: _pool_spec(d)["targetPorts"].append({"number": 8001}),
     "spec.targetPorts", "maxItems"),
    # missing required
    ("InferencePool", lambda d: _pool_spec(d).pop("endpointPickerRef"), "spec", "required"),
    ("InferencePool", lambda d: _pool_spec(d)["selector"].pop("matchLabels"),
     "spec.selector", "required"),
    # the CEL rule: a Service (the default kind) needs a port
    ("InferencePool", lambda d: _pool_spec(d)["endpointPickerRef"].pop("port"),
     "spec.endpointPickerRef", "required"),
    # bad enum, bad pattern, unknown field, another API version
    ("InferencePool", lambda d: _pool_spec(d)["endpointPickerRef"].update(failureMode="Open"),
     "spec.endpointPickerRef.failureMode", "enum"),
    ("InferencePool", lambda d: _pool_spec(d)["selector"]["matchLabels"].update(app="-x-"),
     "spec.selector.matchLabels.app", "pattern"),
    ("InferencePool", lambda d: _pool_spec(d).update(extensionRef={"name": "kvrouter-epp"}),
     "spec", "additionalProperties"),
    ("InferencePool", lambda d: d.update(apiVersion="inference.networking.x-k8s.io/v1alpha2"),
     "apiVersion", "const"),
    ("HTTPRoute", lambda d: _rule(d)["matches"][0]["path"].update(type="Prefix"),
     "spec.rules.0.matches.0.path.type", "enum"),
    ("HTTPRoute", lambda d: _rule(d)["matches"][0]["path"].update(value="v1/"),
     "spec.rules.0.matches.0.path.value", "pattern"),
    ("HTTPRoute", lambda d: _rule(d)["timeouts"].update(request="5 minutes"),
     "spec.rules.0.timeouts.request", "pattern"),
    ("HTTPRoute", lambda d: d["spec"]["parentRefs"][0].pop("name"), "spec.parentRefs.0",
     "required"),
    ("HTTPRoute", lambda d: d["spec"]["parentRefs"][0].update(port=65536),
     "spec.parentRefs.0.port", "maximum"),
    ("HTTPRoute", lambda d: _rule(d)["backendRefs"][0].update(weight=-1),
     "spec.rules.0.backendRefs.0.weight", "minimum"),
    # the CEL rule: a core Service backend needs a port
    ("HTTPRoute", lambda d: _rule(d)["backendRefs"][0].update(group="", kind="Service"),
     "spec.rules.0.backendRefs.0", "required"),
    ("HTTPRoute", lambda d: _rule(d).update(backendRefs=[{"name": "x", "group": "a/b",
                                                          "kind": "InferencePool"}]),
     "spec.rules.0.backendRefs.0.group", "pattern"),
    ("HTTPRoute", lambda d: d["spec"].update(rules=[]), "spec.rules", "minItems"),
])
def test_the_crd_schemas_refuse_a_wrong_manifest(kind: str, break_it: Callable[[Any], Any],
                                                 where: str, validator: str) -> None:
    bad = copy.deepcopy(docs()[kind])
    break_it(bad)
    errors = _crd_errors(bad)
    assert any(e.startswith(f"{where}: {validator}:") for e in errors), errors


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
