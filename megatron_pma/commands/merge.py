"""`megatron-pma merge`: explicit checkpoints, or a window picked from a save dir."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_pma.cli_common import add_schedule_arguments, check_num_models, schedule_kwargs, window_kwargs
from megatron_pma.errors import PMAError
from megatron_pma.names import ORDERS


MAX_AUTO_WORKERS = 8  # the default output has 8 files or more; beyond this, the disk is the limit
WORKERS_ENV = "MEGATRON_PMA_WORKERS"  # e.g. 1 on a shared login node


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*", type=Path, help="checkpoint dirs (any order; sorted by iteration)")
    p.add_argument("--save-dir", type=Path, help="pick the window from this save dir (Megatron-LM, Megatron-Bridge, NeMo 2 checkpoints/, a NeMo-RL checkpoint dir, or a folder of Hugging Face checkpoint-N dirs) instead")
    p.add_argument("--up-to-iteration", type=int, default=None, help="window ends at or before this iteration")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="new checkpoint dir; named iter_XXXXXXX it also updates its parent's tracker")
    add_schedule_arguments(p)
    p.add_argument("--order", default="iteration", choices=ORDERS,
                   help="oldest -> newest: by the iteration each input was saved at (default), or as "
                        "given (for inputs that do not say their iteration; weights follow that order)")
    p.add_argument("--output-iteration", type=int, default=None,
                   help="the iteration the output says it is (default: its iter_XXXXXXX name's, else the "
                        "newest input's); written into its common state")
    p.add_argument("--force", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--allow-single", action="store_true",
                   help="merge a single checkpoint (the output is then a copy of it; refused by default)")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge even if an input holds NaN/Inf")
    p.add_argument("--no-tracker", action="store_true", help="never write the parent's tracker file")
    p.add_argument("--verify-integrity", action="store_true",
                   help="check inputs against their integrity.json and write one for the output")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync before publishing (faster, less durable)")
    p.add_argument("--workers", type=parse_workers, default=os.environ.get(WORKERS_ENV) or "auto",
                   help="processes on this node (forked; no torchrun needed). Default auto: one per usable "
                        f"core, at most {MAX_AUTO_WORKERS} (1 under torchrun/srun, where each rank is one); "
                        f"${WORKERS_ENV} changes the default")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def parse_workers(value: str) -> int | None:
    """``--workers`` / ``$MEGATRON_PMA_WORKERS``: a count >= 1, or None for ``auto``."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def auto_workers() -> int:
    """One process per core this process may run on (cgroup/Slurm affinity), capped; 1 when a
    launcher (torchrun, srun) already made this process one rank of many."""
    from megatron_pma.parallel import launched

    if launched():
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


def run(args: argparse.Namespace) -> int:
    from megatron_pma.layouts import check_is_checkpoint, select_window
    from megatron_pma.checkpoint.discovery import check_checkpoint_dir
    from megatron_pma.checkpoint.publish import created_parents
    from megatron_pma.merge import merge_checkpoints

    check_num_models(args.num_models)
    if args.save_dir and args.checkpoints:
        raise PMAError("give checkpoint dirs or --save-dir, not both")
    if args.save_dir:
        inputs = select_window(args.save_dir, up_to_iteration=args.up_to_iteration, **window_kwargs(args))
    elif args.checkpoints:
        if args.num_models and args.num_models != len(args.checkpoints):
            raise PMAError(f"--num-models {args.num_models} but {len(args.checkpoints)} checkpoints given")
        inputs = args.checkpoints
        for path in inputs:  # a save dir given here is told to use --save-dir, before anything else
            check_checkpoint_dir(path)
            check_is_checkpoint(path)
    else:
        raise PMAError("nothing to merge: give checkpoint dirs or --save-dir")
    if len(inputs) == 1 and not args.allow_single:
        raise PMAError(f"{inputs[0]}: only one checkpoint to merge (the output would be a copy of it); "
                       "pass --allow-single to do that anyway")
    with created_parents(args.output):
        result = merge_checkpoints(inputs, args.output, force=args.force,
                                   allow_nonfinite=args.allow_nonfinite,
                                   update_tracker=False if args.no_tracker else None,
                                   progress=not args.quiet and sys.stderr.isatty(),
                                   fsync=not args.no_fsync, verify_integrity=args.verify_integrity,
                                   workers=args.workers or auto_workers(), order=args.order,
                                   output_iteration=args.output_iteration,
                                   **schedule_kwargs(args))
    if int(os.environ.get("RANK", "0")) == 0:
        pairs = ", ".join(f"{'?' if it is None else it}:{w:.4g}" for it, w in zip(result.iterations, result.weights))
        print(f"merged {len(result.iterations)} checkpoints ({args.method}; iteration:weight {pairs}) "
              f"-> {result.output} [{result.bytes_written / 2**20:.1f} MiB in {result.seconds:.2f} s]")
    return 0
