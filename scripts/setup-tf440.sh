#!/usr/bin/env bash
# Create .venv-tf440 once: transformers 4.40.1 and tokenizers 0.19.0, the versions TinyLLaVA_Factory
# pins, to read the checkpoints we write with the code that reads them there (tests/test_tf440.py,
# benchmarks/factory_crosscheck.py). Its own environment because the project needs transformers 5.
# Exact versions come from the lock locks/venv-tf440.txt (pip constraints: `pip freeze` of an
# environment this script built); torch is installed first (TORCH_SPEC, as in setup.sh), then the
# project with the `tf440` extra (pyproject.toml), editable, without the other extras.
# Idempotent: it re-installs only when pyproject.toml, the lock or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LOCK=locks/venv-tf440.txt

[ -x .venv-tf440/bin/python ] || "$PYTHON" -m venv .venv-tf440
stamp=.venv-tf440/.tinyllava-edge-setup
want=$(cat pyproject.toml "$LOCK" scripts/setup-tf440.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup-tf440: installing into .venv-tf440"
    pip=(.venv-tf440/bin/python -m pip install -q --disable-pip-version-check)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" -c "$LOCK" "$TORCH_SPEC"
    "${pip[@]}" -c "$LOCK" -e ".[tf440]"
    # what the lock names must be what runs (a dependency must not have replaced torch or transformers)
    .venv-tf440/bin/python - "$TORCH_SPEC" <<'PY'
import sys
from importlib.metadata import version

want, have = sys.argv[1].partition("==")[2], version("torch")
if want and not have.startswith(want):
    sys.exit(f"setup-tf440: torch {have} was installed instead of {want}")
if version("transformers") != "4.40.1":
    sys.exit(f"setup-tf440: transformers {version('transformers')} was installed instead of 4.40.1")
PY
    echo "$want" > "$stamp"
fi
