"""deploy/: the manifests parse, the dashboard only queries metrics the code exports, and the
image's command is a real CLI invocation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from kvrouter.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SOURCES = [Path(__file__).resolve().parents[1] / "python" / "kvrouter" / p
           for p in ("server/metrics.py", "events/metrics.py")]


def test_k8s_manifests_parse_and_embed_a_valid_router_config(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "kvrouter.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ConfigMap", "Deployment", "Service"}
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg_file = tmp_path / "router.yaml"
    cfg_file.write_text(cm["data"]["router.yaml"])
    cfg = load_config(cfg_file, env={})
    assert cfg.models[0].name == "llama-3-8b"


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = set()
    for src in SOURCES:
        exported |= set(re.findall(r'"(kvrouter_[a-z_]+)"', src.read_text()))
    dash = json.loads((DEPLOY / "grafana" / "kvrouter.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"kvrouter_[a-z_]+", target["expr"]))
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for name in used:
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s) and name[: -len(s)] in exported), name)
        assert base in exported, f"dashboard queries {name}, which kvrouter does not export"


def test_image_command_and_k8s_args_parse_as_cli_invocations() -> None:
    from kvrouter.cli import build_parser

    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert cmd is not None
    invocations = [json.loads(cmd.group(1))]
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "kvrouter.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    invocations.append(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    for argv in invocations:
        args = build_parser(argv).parse_args(argv)
        assert args.listen == "0.0.0.0:50051"
