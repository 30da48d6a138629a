"""Tiny Megatron-Core GPT pretraining with PMA checkpoint merging during training.

    torchrun --nproc_per_node 2 examples/tiny_pretrain.py --save /tmp/run --tp 1 \
        --train-iters 500 --save-interval 50 --pma-num-models 5 --pma-method sma
    python examples/tiny_pretrain.py --save /tmp/run            # one process, world size 1

Resume: --load DIR (model, optimizer unless --no-load-optim, iteration, data position).
PMA-init: --load DIR/pma --finetune (weights only, iteration reset to 0).
All options: --help. The loop lives in megatron_pma/training/tiny_gpt.py.
"""

import sys
import warnings

from megatron_pma.megatron_cpu import apply_cpu_shims

# megatron-core announces every CPU fallback (no Apex / Transformer Engine) with a warning
warnings.filterwarnings("ignore", message=r".*(Apex|apex|Transformer Engine|transformer_engine).*")

if __name__ == "__main__":  # required: megatron's saver re-imports __main__ in a spawned process
    apply_cpu_shims()
    from megatron_pma.training.tiny_gpt import main

    sys.exit(main())
