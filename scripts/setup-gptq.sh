#!/usr/bin/env bash
# Create .venv-gptq once: the project with the torch, gptq and dev extras, plus GPTQModel 7.7.0.
# Its own environment because gptqmodel declares torch>=2.14.1: a plain install replaces the CPU
# torch with a ~3 GB CUDA build, although it quantizes and runs on torch 2.13 CPU. So torch is
# installed first (TORCH_SPEC, as in setup.sh), then the `gptq` extra (gptqmodel's dependencies,
# pyproject.toml), then gptqmodel itself with --no-deps. The default .venv never holds it.
# Idempotent: it re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
GPTQMODEL_SPEC=gptqmodel==7.7.0

[ -x .venv-gptq/bin/python ] || "$PYTHON" -m venv .venv-gptq
stamp=.venv-gptq/.tinyllava-edge-setup
want=$(cat pyproject.toml scripts/setup-gptq.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup-gptq: installing into .venv-gptq"
    pip=(.venv-gptq/bin/python -m pip install -q --disable-pip-version-check)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" "$TORCH_SPEC"
    "${pip[@]}" -e ".[torch,gptq,dev]"
    "${pip[@]}" --no-deps "$GPTQMODEL_SPEC"
    # the torch it runs on must still be the one asked for (a dependency must not have replaced it)
    .venv-gptq/bin/python - "$TORCH_SPEC" <<'PY'
import sys
from importlib.metadata import version

want, have = sys.argv[1].partition("==")[2], version("torch")
if want and not have.startswith(want):
    sys.exit(f"setup-gptq: torch {have} was installed instead of {want}")
PY
    echo "$want" > "$stamp"
fi
