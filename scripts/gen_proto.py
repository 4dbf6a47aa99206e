"""Regenerate the checked-in protobuf / gRPC code from proto/kvrouter/v1/*.proto.

    python scripts/gen_proto.py          # rewrite python/kvrouter/_proto/v1/
    python scripts/gen_proto.py --check  # exit 1 if the checked-in files are stale

protoc (from grpcio-tools) writes modules that import each other as
`kvrouter.v1.*`, which would collide with the `kvrouter` package itself, so the
output is moved under `kvrouter._proto.v1` and those imports are rewritten.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "kvrouter" / "v1"
OUT_DIR = ROOT / "python" / "kvrouter" / "_proto" / "v1"
PACKAGE = "kvrouter._proto.v1"
INIT_TEXT = '"""Generated protobuf / gRPC code; regenerate with scripts/gen_proto.py."""\n'

_IMPORT_RE = re.compile(r"^from kvrouter\.v1 import ", re.MULTILINE)


def generate() -> dict[str, str]:
    """Run protoc and return {file name: text} of what belongs in OUT_DIR."""
    from grpc_tools import protoc  # only needed here, not at runtime

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    include = Path(protoc.__file__).parent / "_proto"  # well-known types
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit status {rc}")
        gen_dir = Path(tmp) / "kvrouter" / "v1"
        files = {
            p.name: _IMPORT_RE.sub(f"from {PACKAGE} import ", p.read_text())
            for p in sorted(gen_dir.iterdir())
            if p.is_file()
        }
    files["__init__.py"] = INIT_TEXT
    return files


def write(files: dict[str, str]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    parent_init = OUT_DIR.parent / "__init__.py"
    if not parent_init.exists():
        parent_init.write_text(INIT_TEXT)
    for stale in OUT_DIR.iterdir():
        if stale.is_file() and stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)


def stale_files(files: dict[str, str]) -> list[str]:
    problems = []
    present = {p.name for p in OUT_DIR.iterdir() if p.is_file()} if OUT_DIR.is_dir() else set()
    for name, text in files.items():
        path = OUT_DIR / name
        if not path.is_file():
            problems.append(f"missing {path.relative_to(ROOT)}")
        elif path.read_text() != text:
            problems.append(f"out of date {path.relative_to(ROOT)}")
    for name in sorted(present - set(files)):
        if name.endswith((".py", ".pyi")):
            problems.append(f"not generated from any .proto: {(OUT_DIR / name).relative_to(ROOT)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the checked-in code differs")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        problems = stale_files(files)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: python scripts/gen_proto.py", file=sys.stderr)
            return 1
        print(f"{OUT_DIR.relative_to(ROOT)} is current")
        return 0
    write(files)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
