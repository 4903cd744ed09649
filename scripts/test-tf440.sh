#!/usr/bin/env bash
# transformers 4.40.1 (TinyLLaVA_Factory's pin) reads the checkpoints we write: every LLM family x
# vision tower and the default model, written by our code in .venv, loaded by 4.40's own Auto
# classes in .venv-tf440 (tests/test_tf440.py; scripts/setup-tf440.sh says why apart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-tf440.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv-tf440/bin/python -m pytest -q -p no:cacheprovider tests/test_tf440.py "$@"
