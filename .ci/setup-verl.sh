#!/usr/bin/env bash
# Add verl 0.9.1 to ./.venv (made by setup-cpu.sh) without letting it replace the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
pip install -q --no-deps verl==0.9.1
pip install -q -c .ci/requirements-cpu.txt -r .ci/requirements-verl.txt
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "verl ready: $(python -c 'import importlib.metadata as m; print(m.version("verl"))')"
