# Sourced by the scripts: the project's virtual environment, one definition.
# VENV: its folder (KVROUTER_VENV overrides); PY: its interpreter.
VENV=${KVROUTER_VENV:-$(pwd)/.venv}
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
