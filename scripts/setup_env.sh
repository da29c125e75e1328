#!/usr/bin/env bash
# Create (once) the project's virtual environment and install the project into it.
#
# WAVECLIP_TRANSFORMERS picks the transformers release (see docs/compatibility.md):
#   latest (default)  .venv        the newest release that pyproject.toml allows, as on the package index when the
#                                  environment is created (a fresh clone, as CI has, always gets the newest)
#   floor             .venv-floor  the oldest supported release: the lower bound of pyproject.toml's range
# Idempotent: a stamp keyed on pyproject.toml and this script skips the install when nothing changed.
# torch is pinned to 2.13.0 first: on these machines that is a local CPU wheel, while an unpinned torch would pull
# several GB of CUDA packages. On a GPU machine, install the torch you want first.
# Sourced (as scripts/run_tests.sh does), it leaves the environment's folder in WAVECLIP_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
WAVECLIP_TRANSFORMERS=${WAVECLIP_TRANSFORMERS:-latest}
# The supported range, e.g. "transformers>=5.20,<6", and its lower bound.
transformers_range=$(grep -o '"transformers>=[^"]*"' pyproject.toml | tr -d '"')
floor_version=$(sed -n 's/^transformers>=\([0-9.]*\),.*/\1/p' <<<"$transformers_range")
case "$WAVECLIP_TRANSFORMERS" in
    latest) WAVECLIP_VENV=.venv; transformers_pin="$transformers_range" ;;
    floor) WAVECLIP_VENV=.venv-floor; transformers_pin="transformers==$floor_version" ;;
    *)
        echo "WAVECLIP_TRANSFORMERS must be 'latest' or 'floor', got '$WAVECLIP_TRANSFORMERS'." >&2
        exit 1
        ;;
esac
if [ -z "$floor_version" ]; then
    echo "pyproject.toml has no \"transformers>=X,<Y\" dependency to read the supported range from." >&2
    exit 1
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "waveclip-hf needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
if [ ! -x "$WAVECLIP_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$WAVECLIP_VENV"
fi
stamp="$WAVECLIP_VENV/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$WAVECLIP_VENV/bin/python" -m pip install --quiet --upgrade pip
    if ! "$WAVECLIP_VENV/bin/python" -c 'import torch' 2>/dev/null; then
        "$WAVECLIP_VENV/bin/python" -m pip install --quiet "torch==${WAVECLIP_TORCH_VERSION:-2.13.0}"
    fi
    "$WAVECLIP_VENV/bin/python" -m pip install --quiet -e ".[dev,onnx,demo]" "$transformers_pin"
    rm -f "$WAVECLIP_VENV"/.installed-*
    touch "$stamp"
fi
export WAVECLIP_VENV
