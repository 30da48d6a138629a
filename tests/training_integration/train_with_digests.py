"""The tiny pretraining loop of examples/tiny_pretrain.py, recording what each save wrote.

    python train_with_digests.py DIGESTS.jsonl [tiny_pretrain args...]

Runs ``megatron_pma.training.tiny_gpt.train`` (real megatron-core GPTModel, real
``dist_checkpointing.save``, tracker written last) with a hook that, as soon as a save is final,
appends ``{"iteration", "tracker", "files": {name: sha256}}`` of that checkpoint to DIGESTS.jsonl:
the trainer's own view of the bytes it wrote, to compare with the files at the end of a test.
The training summary goes to DIGESTS.jsonl.summary.json.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from megatron_pma.megatron_cpu import apply_cpu_shims


class DigestOnSave:
    def __init__(self, save_dir, out):
        self.save_dir, self.out = Path(save_dir), Path(out)

    def on_checkpoint_saved(self, iteration: int) -> None:
        ckpt = self.save_dir / f"iter_{iteration:07d}"
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(ckpt.iterdir()) if p.is_file()}
        tracker = (self.save_dir / "latest_checkpointed_iteration.txt").read_text().strip()
        with open(self.out, "a") as f:
            f.write(json.dumps({"iteration": iteration, "tracker": tracker, "files": files}) + "\n")


if __name__ == "__main__":  # megatron's saver re-imports __main__ in a spawned process
    apply_cpu_shims()
    from megatron_pma.training.tiny_gpt import parse_args, train

    args = parse_args(sys.argv[2:])
    summary = train(args, hook=DigestOnSave(args.save, sys.argv[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[1] + ".summary.json").write_text(json.dumps(summary, default=str))
