#!/usr/bin/env bash
# Create .venv once and install the project with every extra the pipeline and the tests use.
# Idempotent: it re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch first, pinned: on this machine kind `torch==2.13.0` is a CPU wheel already on disk, while
# an unpinned torch (or one pulled in by another package) downloads a multi-GB CUDA build.
# GPU users set TORCH_SPEC to the build they want (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.tinyllava-edge-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing into .venv (the first time compiles llama.cpp for llama-cpp-python: ~8 minutes on 2 cores)"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,dev]"
    echo "$want" > "$stamp"
fi
