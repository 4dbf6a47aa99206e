"""deploy/ under the secure defaults (issue 13 findings 1 and 8): the shipped router config
listens on the pod address only with TLS and authentication, takes its Redis URL (with a
password) from a Secret, mounts the files its config names, and serves /metrics where the
scrape annotation points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvrouter.config import ConfigError, load_config

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "kvrouter.yaml"


def _docs() -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text())}


def test_router_config_is_exposed_only_with_tls_and_auth(tmp_path: Path) -> None:
    text = _docs()["ConfigMap"]["data"]["router.yaml"]
    cfg_file = tmp_path / "router.yaml"
    cfg_file.write_text(text)
    r = load_config(cfg_file, env={}).router
    assert r.listen.startswith("0.0.0.0:") and r.tls_cert and r.auth_file
    assert r.metrics_host == "0.0.0.0" and r.metrics_tls  # finding 8: the scrape reaches it
    assert r.redis_url is None  # not in the ConfigMap: the URL holds a password
    stripped = "\n".join(line for line in text.splitlines()
                         if not line.strip().startswith(("tls_", "auth_file")))
    cfg_file.write_text(stripped)
    with pytest.raises(ConfigError, match="reachable from other machines"):
        load_config(cfg_file, env={})


def test_deployment_mounts_what_the_config_names() -> None:
    docs = _docs()
    router = yaml.safe_load(docs["ConfigMap"]["data"]["router.yaml"])["router"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tls": "kvrouter-tls", "auth": "kvrouter-auth"}
    for key in ("tls_cert", "tls_key", "tls_ca"):
        assert router[key].startswith(mounts["tls"] + "/")
    assert router["auth_file"].startswith(mounts["auth"] + "/")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert env == {"KVROUTER_REDIS_URL": "kvrouter-redis"}
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(router["metrics_port"])
    assert annotations["prometheus.io/scheme"] == "https"
    assert pod["securityContext"]["fsGroup"] == 10001
