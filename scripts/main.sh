#!/usr/bin/env bash
# The main job on the built-in default: the tiny-shapes pipeline (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tinyllava-edge "$@"
