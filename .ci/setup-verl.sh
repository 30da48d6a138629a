#!/usr/bin/env bash
# Add verl 0.9.1 to ./.venv (made by setup-cpu.sh) without letting it replace the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
pip install -q --no-deps verl==0.9.1
# .ci/requirements-verl.txt: first block with its dependencies (constrained to the CPU pins); the block for
# verl's V1 trainer (from its "# verl's V1 trainer" line on) without, as verl itself, so that nothing
# already pinned moves (all their dependencies are in the first block's closure).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "/^# verl's V1 trainer/,\$d" .ci/requirements-verl.txt > "$tmp/with-deps.txt"
sed -n "/^# verl's V1 trainer/,\$p" .ci/requirements-verl.txt | grep -v '^#' > "$tmp/no-deps.txt"
pip install -q -c .ci/requirements-cpu.txt -r "$tmp/with-deps.txt"
pip install -q --no-deps -r "$tmp/no-deps.txt"
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
python -c "import verl.trainer.ppo.v1"  # the V1 trainer imports (TransferQueue & co.)
echo "verl ready: $(python -c 'import importlib.metadata as m; print(m.version("verl"))')"
