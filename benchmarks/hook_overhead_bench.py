"""Training-step time with the PMA hook on vs off, in the same run.

    python benchmarks/hook_overhead_bench.py [--steps 1300] [--block 100] [--save-interval 20]
                                             [--num-models 5] [--threads 1] [--json OUT.json]

One tiny Megatron-Core GPT run (world size 1, gloo) saves a checkpoint every ``--save-interval``
steps. The steps are cut into blocks of ``--block`` steps that alternate hook OFF / hook ON (the
first block is warm-up and not counted). In an ON block every save is handed to a real
:class:`megatron_pma.training.PMAHook` (SMA over the last ``--num-models`` checkpoints, real engine,
background merge process); in an OFF block the saves happen the same way but nobody merges. Before an
OFF block starts, the hook's last merge is waited for outside the timed steps, so no merge spills into
an OFF block. Step time = forward + backward + all-reduce + optimizer step (checkpoint saves are the
same in both modes and are excluded); the cost of ``on_checkpoint_saved`` itself is reported separately.

Prints the mean and median step time per mode, the mean of the per-pair ratios ON/OFF, and the
overhead in percent (target: <= 2 %); also the training process's CPU time per step (all its
threads, the hook's included), which other jobs on a shared machine do not disturb as much as
wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def block_of(iteration: int, block: int) -> int:
    return (iteration - 1) // block


def hook_on(b: int) -> bool:
    """Block 0: warm-up (off, not counted); then OFF, ON, OFF, ON, ..."""
    return b > 0 and b % 2 == 0


class AlternatingHook:
    """Hands saves of ON blocks to the real hook; at the end of an ON block, waits for its last merge
    (outside the timed steps) so that no merge runs during the next OFF block."""

    def __init__(self, hook, block):
        self.hook, self.block, self.call_seconds, self.drain_seconds = hook, block, [], []

    def on_checkpoint_saved(self, iteration):
        if not hook_on(block_of(iteration, self.block)):
            return
        t = time.perf_counter()
        self.hook.on_checkpoint_saved(iteration)
        self.call_seconds.append(time.perf_counter() - t)
        if iteration % self.block == 0:
            t = time.perf_counter()
            self.hook.wait()
            self.drain_seconds.append(time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--block", type=int, default=100)
    p.add_argument("--save-interval", type=int, default=20)
    p.add_argument("--num-models", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--nice", type=int, default=10, help="niceness of the merge process")
    p.add_argument("--dir", default=None, help="save dir (default: a temp dir, deleted)")
    p.add_argument("--json", default=None, help="write the numbers here")
    a = p.parse_args(argv)
    if a.block % a.save_interval:
        p.error("--block must be a multiple of --save-interval")

    from megatron_pma.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_pma.training import PMAHook
    from megatron_pma.training.tiny_gpt import parse_args, train

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="pma_hook_bench_"))
    save = root / "run"
    shutil.rmtree(save, ignore_errors=True)
    args = parse_args([])
    args.save, args.train_iters, args.save_interval = str(save), a.steps, a.save_interval
    args.threads, args.micro_batch_size, args.log_interval, args.quiet = a.threads, a.micro_batch_size, 0, True
    args.num_val_windows = 64

    real = PMAHook(save, a.num_models, method="sma", nice=a.nice)
    alt = AlternatingHook(real, a.block)
    steps = {True: [], False: []}  # hook on? -> [(block, wall seconds)]
    cpu = {True: [], False: []}    # hook on? -> [(block, process CPU seconds)]

    def on_step(iteration, loss, dt, cpu_dt):
        b = block_of(iteration, a.block)
        if b > 0:
            steps[hook_on(b)].append((b, dt))
            cpu[hook_on(b)].append((b, cpu_dt))

    t0 = time.perf_counter()
    train(args, hook=alt, step_callback=on_step)
    real.close()
    wall = time.perf_counter() - t0

    def per_block(mode, src=steps):
        d = {}
        for b, s in src[mode]:
            d.setdefault(b, []).append(s)
        return {b: statistics.mean(v) for b, v in d.items()}

    off, on = per_block(False), per_block(True)
    pairs = [(off[b], on[b + 1]) for b in sorted(off) if b + 1 in on]  # (OFF block, next ON block)
    ratios = [n / f for f, n in pairs]
    coff, con = per_block(False, cpu), per_block(True, cpu)
    cpu_ratios = [con[b + 1] / coff[b] for b in sorted(coff) if b + 1 in con]
    merges = [r for r in real.results if r.status == "ok"]
    res = {
        "steps": a.steps, "block": a.block, "save_interval": a.save_interval, "num_models": a.num_models,
        "threads": a.threads, "nice": a.nice,
        "off_mean_ms": 1e3 * statistics.mean(s for _, s in steps[False]),
        "on_mean_ms": 1e3 * statistics.mean(s for _, s in steps[True]),
        "off_median_ms": 1e3 * statistics.median(s for _, s in steps[False]),
        "on_median_ms": 1e3 * statistics.median(s for _, s in steps[True]),
        "pair_ratios": ratios,
        "mean_ratio": statistics.mean(ratios) if ratios else None,
        "median_ratio_of_medians": (statistics.median(s for _, s in steps[True])
                                    / statistics.median(s for _, s in steps[False])),
        "off_cpu_mean_ms": 1e3 * statistics.mean(s for _, s in cpu[False]),
        "on_cpu_mean_ms": 1e3 * statistics.mean(s for _, s in cpu[True]),
        "cpu_pair_ratios": cpu_ratios,
        "cpu_mean_ratio": statistics.mean(cpu_ratios) if cpu_ratios else None,
        "merges_ok": len(merges), "merges_failed": sum(r.status == "failed" for r in real.results),
        "merges_skipped": sum(r.status == "skipped" for r in real.results),
        "mean_merge_s": statistics.mean(r.seconds for r in merges) if merges else None,
        "hook_call_max_ms": 1e3 * max(alt.call_seconds) if alt.call_seconds else None,
        "hook_call_mean_ms": 1e3 * statistics.mean(alt.call_seconds) if alt.call_seconds else None,
        "drain_s": alt.drain_seconds, "wall_s": wall,
    }
    print(f"step time  OFF mean {res['off_mean_ms']:.2f} ms (median {res['off_median_ms']:.2f})  |  "
          f"ON mean {res['on_mean_ms']:.2f} ms (median {res['on_median_ms']:.2f})")
    print("ON/OFF per block pair: " + ", ".join(f"{r:.3f}" for r in ratios))
    if res["mean_ratio"] is not None:
        print(f"mean ratio ON/OFF = {res['mean_ratio']:.4f}  -> hook overhead {100 * (res['mean_ratio'] - 1):+.2f} % "
              f"(median-based {100 * (res['median_ratio_of_medians'] - 1):+.2f} %; target <= +2 %)")
    if res["cpu_mean_ratio"] is not None:
        print(f"CPU time of the training process per step: OFF {res['off_cpu_mean_ms']:.2f} ms, ON "
              f"{res['on_cpu_mean_ms']:.2f} ms -> {100 * (res['cpu_mean_ratio'] - 1):+.2f} % (insensitive to other "
              "jobs taking the cores; includes the hook's threads)")
    print(f"merges: {res['merges_ok']} ok ({res['mean_merge_s'] or 0:.2f} s each), {res['merges_skipped']} "
          f"skipped, {res['merges_failed']} failed; on_checkpoint_saved max {res['hook_call_max_ms'] or 0:.3f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if res["merges_failed"] == 0 else 1


if __name__ == "__main__":  # required: megatron's saver re-imports __main__ in a spawned process
    sys.exit(main())
