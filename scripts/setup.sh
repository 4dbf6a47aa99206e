#!/usr/bin/env bash
# Installs kvrouter with its Rust extension and everything the tests and benches need.
# Needs: Python >= 3.11 with pip, and a Rust toolchain (cargo) for the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) to build kvrouter's core" >&2
  exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
$PY -m pip install --quiet --upgrade "maturin>=1.5,<2"
# Editable install: the package is imported from python/, the extension is built in release mode.
$PY -m pip install --quiet --no-build-isolation -e ".[test,bench]"
$PY -c "import kvrouter._core" && echo "setup: kvrouter installed"
