"""JSON Schemas (draft 2020-12) of the InferencePool and HTTPRoute fields that
deploy/k8s/gateway/kvrouter-epp.yaml uses, written from the published API types (facts:
types, required fields, enums, patterns, bounds, list limits, as their validation markers
state them; the CRDs are generated from these markers). Sources:

* InferencePool, inference.networking.k8s.io/v1: kubernetes-sigs/gateway-api-inference-extension
  api/v1/inferencepool_types.go @ ca3d9dd43a88f33bafea0d873ee368621d21ff8d and
  api/v1/shared_types.go @ 573509ed0018e8b54b6c0c26f6e8c4260cf2a691
  (config/crd/bases/inference.networking.k8s.io_inferencepools.yaml is generated from them).
* HTTPRoute, gateway.networking.k8s.io/v1 (standard channel): kubernetes-sigs/gateway-api
  apis/v1/httproute_types.go @ 8a587c3a4ddc918ddb1cd13c146ebc5ab7fd82d6,
  apis/v1/shared_types.go @ 1c3cc4c418e2ff53635012467a4f0237b05999ff and
  apis/v1/object_reference_types.go @ c70c6afec71722ef33e7a0b03ec22d03f0fbe20c
  (config/crd/standard/gateway.networking.k8s.io_httproutes.yaml).

CEL rules (x-kubernetes-validations) that bear on these fields are written as JSON Schema
conditions where they can be (noted at each). Objects list only the fields the manifest
uses and refuse others (`additionalProperties: false`, like `kubectl --validate=strict`
against the real CRD for misspelt fields): a field the manifest starts to use must be added
here from the same sources.
"""

from __future__ import annotations

from typing import Any

# Kubernetes-wide string forms, as the API types' markers give them
GROUP = {"type": "string", "maxLength": 253,
         "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
KIND = {"type": "string", "minLength": 1, "maxLength": 63,
        "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
OBJECT_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 63,
             "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
SECTION_NAME = {"type": "string", "minLength": 1, "maxLength": 253,
                "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
PORT_NUMBER = {"type": "integer", "minimum": 1, "maximum": 65535}  # int32
INT32 = {"type": "integer", "minimum": -(1 << 31), "maximum": (1 << 31) - 1}
# LabelKey / LabelValue (shared_types.go; the key pattern is the marker's, backslashes included)
LABEL_KEY = {"type": "string", "minLength": 1, "maxLength": 253,
             "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"}
LABEL_VALUE = {"type": "string", "minLength": 0, "maxLength": 63,
               "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
# Gateway API Duration (GEP-2257)
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}

# metadata: what the API server requires of every object (a DNS-1123 subdomain name)
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 253,
                                    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                               r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
                           "namespace": NAMESPACE}}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any,
         ) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    out.update(extra)
    return out


PORT = _obj({"number": PORT_NUMBER}, ["number"])

INFERENCE_POOL: dict[str, Any] = _obj({
    "apiVersion": {"const": "inference.networking.k8s.io/v1"},
    "kind": {"const": "InferencePool"},
    "metadata": METADATA,
    "spec": _obj({
        # LabelSelector: matchLabels +required, MaxItems=64 on the map (at most 64 labels)
        "selector": _obj({"matchLabels": {"type": "object", "maxProperties": 64,
                                          "propertyNames": LABEL_KEY,
                                          "additionalProperties": LABEL_VALUE}},
                         ["matchLabels"]),
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": PORT},
        "endpointPickerRef": _obj(
            {"group": GROUP, "kind": KIND, "name": OBJECT_NAME, "port": PORT,
             "failureMode": {"type": "string", "enum": ["FailOpen", "FailClose"]}},
            ["name"],
            # CEL: self.kind != 'Service' || has(self.port); kind defaults to Service
            **{"if": {"anyOf": [{"not": {"required": ["kind"]}},
                                {"properties": {"kind": {"const": "Service"}},
                                 "required": ["kind"]}]},
               "then": {"required": ["port"]}}),
    }, ["selector", "targetPorts", "endpointPickerRef"]),
}, ["apiVersion", "kind", "metadata", "spec"])

PARENT_REFERENCE = _obj({"group": GROUP, "kind": KIND, "namespace": NAMESPACE,
                         "name": OBJECT_NAME, "sectionName": SECTION_NAME,
                         "port": PORT_NUMBER}, ["name"])

PATH_MATCH = _obj(
    {"type": {"type": "string", "enum": ["Exact", "PathPrefix", "RegularExpression"]},
     "value": {"type": "string", "maxLength": 1024}},
    # CEL (HTTPPathMatch): for Exact and PathPrefix (type defaults to PathPrefix) the value
    # starts with '/', has no '//', and only the listed characters or %XX escapes
    **{"if": {"anyOf": [{"not": {"required": ["type"]}},
                        {"properties": {"type": {"enum": ["Exact", "PathPrefix"]}},
                         "required": ["type"]}]},
       "then": {"properties": {"value": {"allOf": [
           {"pattern": r"^/"}, {"not": {"pattern": "//"}},
           {"pattern": r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$"}]}}}})

HTTP_BACKEND_REF = _obj(
    {"group": GROUP, "kind": KIND, "name": OBJECT_NAME, "namespace": NAMESPACE,
     "port": INT32, "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}},
    ["name"],
    # CEL (BackendObjectReference): a core-group Service needs a port; group defaults to "",
    # kind to Service
    **{"if": {"allOf": [
        {"anyOf": [{"not": {"required": ["group"]}}, {"properties": {"group": {"const": ""}}}]},
        {"anyOf": [{"not": {"required": ["kind"]}},
                   {"properties": {"kind": {"const": "Service"}}}]}]},
       "then": {"required": ["port"]}})

HTTP_ROUTE: dict[str, Any] = _obj({
    "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
    "kind": {"const": "HTTPRoute"},
    "metadata": METADATA,
    "spec": _obj({
        "parentRefs": {"type": "array", "maxItems": 32, "items": PARENT_REFERENCE},
        "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": _obj({
            "matches": {"type": "array", "maxItems": 64,
                        "items": _obj({"path": PATH_MATCH})},
            "backendRefs": {"type": "array", "maxItems": 16, "items": HTTP_BACKEND_REF},
            "timeouts": _obj({"request": DURATION, "backendRequest": DURATION}),
        })},
    }),
}, ["apiVersion", "kind", "metadata", "spec"])

SCHEMAS = {"InferencePool": INFERENCE_POOL, "HTTPRoute": HTTP_ROUTE}
