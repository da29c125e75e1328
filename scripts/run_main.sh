#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the whole method end to end on the generated
# offline benchmark (data -> teacher -> distilled student -> evaluation -> pipeline). Extra arguments go to
# `python -m waveclip_hf.experiments.end_to_end`, e.g. `--size large` on a GPU machine; `--preset adaptive-448 ...`
# runs `python -m waveclip_hf.experiments.adaptive_resolution` instead (docs/adaptive_resolution.md).
set -euo pipefail
# The job's folders default to the current directory (.cache/end_to_end and docs): run from the repository root,
# so that they are this checkout's.
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
if [[ "${1:-}" == "--preset" ]]; then  # e.g. --preset adaptive-448: docs/adaptive_resolution.md
    exec .venv/bin/python -m waveclip_hf.experiments.adaptive_resolution "$@"
fi
exec .venv/bin/python -m waveclip_hf.experiments.end_to_end "$@"
