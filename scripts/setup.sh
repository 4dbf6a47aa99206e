#!/usr/bin/env bash
# Installs kvrouter with its Rust extension and everything the tests and benches need into the
# project's virtual environment (.venv, or $KVROUTER_VENV), so a distribution's externally managed
# Python (PEP 668) is never written to. Needs: Python >= 3.11 and a Rust toolchain (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) to build kvrouter's core" >&2
  exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
if [ ! -x "$VENV/bin/python" ]; then
  BASE_PY=${PYTHON:-python3}
  if ! "$BASE_PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    # Debian/Ubuntu ship venv (ensurepip) separately: install it when we may, else say so.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing python3-venv" >&2
      (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null
      "$BASE_PY" -m venv "$VENV"
    else
      echo "setup: '$BASE_PY -m venv' failed; install python3-venv (Debian/Ubuntu) and rerun" >&2
      exit 1
    fi
  fi
fi
"$PY" -m pip install --quiet --upgrade pip "maturin>=1.5,<2"
# Editable install: the package is imported from python/, the extension is built in release mode.
"$PY" -m pip install --quiet --no-build-isolation -e ".[test,bench]"
"$PY" -c "import kvrouter._core" && echo "setup: kvrouter installed in $VENV (run $VENV/bin/kvrouter)"
