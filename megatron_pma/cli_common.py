"""Merge options shared by `merge`, `watch` and the training launcher."""

from __future__ import annotations

import argparse

from megatron_pma import schedules
from megatron_pma.errors import PMAError
from megatron_pma.names import OPTIMIZER_MODES, SAVE_DTYPES


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights must be comma-separated numbers, got {text!r}")


def add_schedule_arguments(parser: argparse.ArgumentParser, *, window: bool = True) -> None:
    g = parser.add_argument_group("merge schedule")
    g.add_argument("--method", default="sma", choices=schedules.METHODS,
                   help="weights: sma (1/N), ema (--alpha), wma (linear), lawa (uniform over a "
                        "strided window), wsm (emulates an LR decay, --decay), custom (--weights)")
    g.add_argument("--decay", default=None, choices=schedules.DECAYS,
                   help=f"wsm: the LR decay the merge emulates over the window (default {schedules.DEFAULT_DECAY})")
    g.add_argument("--alpha", type=float, default=0.2, help="EMA smoothing factor (default 0.2)")
    g.add_argument("--weights", type=_weights, default=None, help="custom weights w1,w2,... oldest first")
    g.add_argument("--normalize", action="store_true", help="rescale custom weights to sum to 1")
    g.add_argument("--allow-extrapolation", action="store_true",
                   help="accept custom weights that are negative or do not sum to 1 (model soups, task "
                        "arithmetic); still finite, recorded in the provenance")
    g.add_argument("--save-dtype", default="input", choices=list(SAVE_DTYPES),
                   help="dtype of the merged model weights (default input: as stored); optimizer state "
                        "keeps its own")
    g.add_argument("--merge-hf-export", action="store_true",
                   help="Megatron-Bridge: the output's hf/ is the merge of every input's Hugging Face export "
                        "(hf/), with the same weights; refused unless every input has one, with the same "
                        "tensors (default: left out, recorded in pma_provenance.json)")
    g.add_argument("--optimizer", default="drop", choices=OPTIMIZER_MODES,
                   help="optimizer state in the output (default drop: resume with --no-load-optim/--finetune)")
    if window:
        w = parser.add_argument_group("window (with --save-dir)")
        w.add_argument("--num-models", type=int, default=None, help="N checkpoints to merge")
        w.add_argument("--interval-iters", type=int, default=None, help="spacing in iterations")
        w.add_argument("--interval-tokens", type=float, default=None, help="spacing in tokens (e.g. 4e9)")
        w.add_argument("--tokens-per-iter", type=int, default=None,
                       help="override tokens per iteration (default: from the checkpoint's args)")
        w.add_argument("--every", type=int, default=1, help="LAWA stride: take every s-th save")


def schedule_kwargs(args: argparse.Namespace) -> dict:
    return dict(method=schedules.method_spec(args.method, args.decay), alpha=args.alpha, weights=args.weights,
                normalize=args.normalize, optimizer=args.optimizer, save_dtype=args.save_dtype,
                allow_extrapolation=args.allow_extrapolation, merge_hf_export=args.merge_hf_export)


def check_num_models(n: int | None) -> None:
    """``--num-models`` given as 0 or less is refused as such (not as "missing")."""
    if n is not None and n < 1:
        raise PMAError(f"--num-models must be >= 1, got {n}")


def window_kwargs(args: argparse.Namespace) -> dict:
    check_num_models(args.num_models)
    if args.num_models is None:
        raise PMAError("--num-models is required with --save-dir")
    return dict(num_models=args.num_models, interval_iters=args.interval_iters,
                interval_tokens=int(args.interval_tokens) if args.interval_tokens else None,
                tokens_per_iter=args.tokens_per_iter, every=args.every)
