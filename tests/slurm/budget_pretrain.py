"""examples/tiny_pretrain.py with Megatron-LM's ``--exit-interval K`` (test trainer for job chaining).

Megatron-LM's pretrain_gpt.py stops early, after saving, when ``--exit-interval`` or
``--exit-duration-in-mins`` is reached, and exits 0; slurm/pretrain_pma.sh then sees a saved
iteration below ``--train-iters`` and (AUTO_RESUBMIT=1) chains the next job. The tiny trainer has no
such flag, so this wrapper gives it one: it resumes from ``--load`` like the trainer does and trains
only up to the next multiple of K (saving there), or to ``--train-iters`` if that comes first.
"""

import sys
from pathlib import Path

from megatron_pma.megatron_cpu import apply_cpu_shims


def _pop(argv: list[str], flag: str):
    for i, a in enumerate(argv):
        if a == flag:
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def budget_argv(argv: list[str]) -> list[str]:
    argv = list(argv)
    _pop(argv, "--exit-duration-in-mins")  # accepted like Megatron-LM; these runs take seconds
    k = _pop(argv, "--exit-interval")
    if k is None:
        return argv
    k = int(k)
    target = int(_pop(argv, "--train-iters") or 300)
    load = _pop(argv, "--load")
    start = 0
    if load:
        argv += ["--load", load]
        t = Path(load) / "latest_checkpointed_iteration.txt"
        if t.exists():
            start = int(t.read_text().strip())
    stop = min(target, (start // k + 1) * k)
    return argv + ["--train-iters", str(stop)]


if __name__ == "__main__":  # megatron's saver re-imports __main__ in a spawned process
    apply_cpu_shims()
    from megatron_pma.training.tiny_gpt import main

    sys.exit(main(budget_argv(sys.argv[1:])))
