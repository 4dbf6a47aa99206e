"""The checked-in generated protobuf / gRPC code matches proto/ (scripts/gen_proto.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_generated_modules_import_under_the_package() -> None:
    from kvrouter._proto.v1 import engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc

    assert router_pb2.DESCRIPTOR.package == "kvrouter.v1"
    assert "Router" in router_pb2.DESCRIPTOR.services_by_name
    assert "Engine" in engine_pb2.DESCRIPTOR.services_by_name
    assert hasattr(router_pb2_grpc, "RouterStub") and hasattr(engine_pb2_grpc, "EngineStub")
    dp = engine_pb2.GenerateRequest().disaggregated
    assert {"request_type", "first_gen_tokens", "ctx_request_id", "opaque_state"} <= {
        f.name for f in dp.DESCRIPTOR.fields}
