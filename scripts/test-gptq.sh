#!/usr/bin/env bash
# The GPTQ tests (marker gptq) in their own environment, .venv-gptq (scripts/setup-gptq.sh says why).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-gptq.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the whole file: the `gptq`-marked tests and the ones the main suite runs too
exec .venv-gptq/bin/python -m pytest -q -p no:cacheprovider tests/test_gptq.py "$@"
