#!/usr/bin/env bash
# Create .venv once and install the project with every extra the pipeline and the tests use, at
# the exact versions of locks/venv.txt. Idempotent: it re-installs only when the lock,
# pyproject.toml or these scripts changed.
#   bash scripts/setup.sh            the locked environment (what the README's commands use)
#   bash scripts/setup.sh --latest   .venv anew at the newest versions pyproject.toml allows, and
#                                    locks/venv.txt rewritten from it (then run the tests, commit)
set -euo pipefail
cd "$(dirname "$0")/.."
# On this machine kind `torch==2.13.0` is a CPU wheel already on disk, while an unpinned torch (or
# one pulled in by another package) downloads a multi-GB CUDA build: torch is installed first,
# pinned by TORCH_SPEC (GPU users set it to the build they want).
source scripts/lib-env.sh

if env_begin .venv locks/venv.txt scripts/setup.sh; then
    echo "setup: installing into .venv (the first time compiles llama.cpp for llama-cpp-python: ~8 minutes on 2 cores)"
    env_pip --upgrade pip setuptools wheel
    env_pip "$TORCH_SPEC"
    env_pip -e ".[all,dev]"
    env_check_torch
    env_end
fi
