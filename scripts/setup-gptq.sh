#!/usr/bin/env bash
# Create .venv-gptq once: the project with the torch, gptq and dev extras, plus GPTQModel 7.7.0, at
# the exact versions of locks/venv-gptq.txt (`--latest`: anew from the ranges, lock rewritten;
# scripts/lib-env.sh). Its own environment because gptqmodel declares torch>=2.14.1: a plain
# install replaces the CPU torch with a ~3 GB CUDA build, although it quantizes and runs on torch
# 2.13 CPU. So torch is installed first (TORCH_SPEC), then the `gptq` extra (gptqmodel's
# dependencies, pyproject.toml), then gptqmodel itself with --no-deps. The default .venv never
# holds it. Idempotent: it re-installs only when the lock, pyproject.toml or these scripts changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-env.sh
GPTQMODEL_SPEC=gptqmodel==7.7.0

if env_begin .venv-gptq locks/venv-gptq.txt scripts/setup-gptq.sh; then
    echo "setup-gptq: installing into .venv-gptq"
    env_pip --upgrade pip setuptools wheel
    env_pip "$TORCH_SPEC"
    env_pip -e ".[torch,gptq,dev]"
    env_pip --no-deps "$GPTQMODEL_SPEC"
    env_check_torch
    env_end
fi
