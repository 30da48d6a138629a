"""Tiny Megatron-Core GPT pretraining with PMA checkpoint merging during training.

    torchrun --nproc_per_node 2 examples/tiny_pretrain.py --save /tmp/run --tp 1 \
        --train-iters 500 --save-interval 50 --pma-num-models 5 --pma-method sma
    python examples/tiny_pretrain.py --save /tmp/run            # one process, world size 1

Resume: --load DIR (model, optimizer unless --no-load-optim, iteration, data position).
PMA-init: --load DIR/pma --finetune (weights only, iteration reset to 0).
All options: --help. The loop lives in megatron_pma/training/tiny_gpt.py.
"""

import logging
import sys

from megatron_pma.megatron_cpu import apply_cpu_shims


def log_pma_merges() -> None:
    """Print what the PMA hook reports on its logger: each merge (inputs, output, seconds), and
    merges skipped for a newer save or failed."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("megatron_pma.training")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":  # required: megatron's saver re-imports __main__ in a spawned process
    apply_cpu_shims()
    if "--quiet" not in sys.argv:
        log_pma_merges()
    from megatron_pma.training.tiny_gpt import main

    sys.exit(main())
