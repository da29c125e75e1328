#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m slow` for the end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
