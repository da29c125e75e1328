#!/usr/bin/env bash
# The README's test command: set up the environment if needed, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m slow` for the end-to-end tests.
# WAVECLIP_TRANSFORMERS=floor runs it on the oldest supported transformers release instead of the newest
# (see scripts/setup_env.sh and docs/compatibility.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
echo "waveclip-hf tests on $("$WAVECLIP_VENV/bin/python" -c 'import torch, transformers; print(f"transformers {transformers.__version__}, torch {torch.__version__}")') ($WAVECLIP_VENV)"
exec "$WAVECLIP_VENV/bin/python" -m pytest "$@"
