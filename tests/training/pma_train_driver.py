"""Run several tiny_pretrain invocations in ONE process (saves the interpreter/megatron start-up
per run in the tests): ``python pma_train_driver.py '[[argv...], {"merge": {...}}, [argv...]]'``.
A list is a tiny_pretrain command line; ``{"merge": {"save_dir", "num_models", "up_to_iteration",
"output", "optimizer"}}`` merges a window with the real engine in between."""

import json
import sys

from megatron_pma.megatron_cpu import apply_cpu_shims

if __name__ == "__main__":  # megatron's saver re-imports __main__ in a spawned process
    apply_cpu_shims()
    from megatron_pma.training.tiny_gpt import main

    for item in json.loads(sys.argv[1]):
        if isinstance(item, dict):
            from megatron_pma.layouts import select_window
            from megatron_pma.merge import merge_checkpoints

            m = item["merge"]
            window = select_window(m["save_dir"], m["num_models"], up_to_iteration=m.get("up_to_iteration"))
            merge_checkpoints(window, m["output"], method=m.get("method", "sma"),
                              optimizer=m.get("optimizer", "drop"), progress=False)
        else:
            main([str(a) for a in item])
