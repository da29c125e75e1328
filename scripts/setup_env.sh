#!/usr/bin/env bash
# Create (once) the project-local virtual environment .venv and install the project into it.
# Idempotent: a stamp keyed on pyproject.toml skips the install when nothing changed.
# torch is pinned to 2.13.0 first: on these machines that is a local CPU wheel, while an unpinned
# torch would pull several GB of CUDA packages. On a GPU machine, install the torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "waveclip-hf needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        .venv/bin/python -m pip install --quiet "torch==${WAVECLIP_TORCH_VERSION:-2.13.0}"
    fi
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
