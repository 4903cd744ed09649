#!/usr/bin/env bash
# Create .venv-tf440 once: transformers 4.40.1 and tokenizers 0.19.0, the versions TinyLLaVA_Factory
# pins, with the project (the `tf440` extra: pyproject.toml) at the exact versions of
# locks/venv-tf440.txt (`--latest`: anew from the ranges, lock rewritten; scripts/lib-env.sh).
# Its own environment because the project runs on transformers 5: here the code the Factory
# reads our checkpoints with loads them (tests/test_tf440.py, benchmarks/factory_crosscheck.py).
# Idempotent: it re-installs only when the lock, pyproject.toml or these scripts changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-env.sh

if env_begin .venv-tf440 locks/venv-tf440.txt scripts/setup-tf440.sh; then
    echo "setup-tf440: installing into .venv-tf440"
    env_pip --upgrade pip setuptools wheel
    env_pip "$TORCH_SPEC"
    env_pip -e ".[tf440]"
    env_check_torch
    "$ENV_DIR/bin/python" -c 'import sys, transformers; v = transformers.__version__; sys.exit(None if v == "4.40.1" else f"setup-tf440: transformers {v} was installed instead of 4.40.1")'
    env_end
fi
