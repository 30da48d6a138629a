"""The demo's measurements for one seed: each function trains / merges / evaluates for real.

All runs use the tiny Megatron-Core GPT of :mod:`megatron_pma.training.tiny_gpt`, the hook
(:class:`megatron_pma.training.PMAHook`) and the public merge engine; nothing is simulated.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from megatron_pma.demo import stats

PMA_ARMS = ("last", "sma", "ema", "wma", "wsm:linear", "wsm:cosine", "wsm:inv-sqrt", "wsm:minus-sqrt", "annealed")
MERGED_ARMS = tuple(m for m in PMA_ARMS if m not in ("last", "annealed"))


def train_args(a, seed: int, save: Path | None, **over) -> argparse.Namespace:
    from megatron_pma.training.tiny_gpt import parse_args

    args = parse_args([])
    args.seed = seed
    args.save = str(save) if save is not None else None
    args.train_iters = a.train_iters
    args.save_interval = a.save_interval
    args.lr = a.lr
    args.lr_warmup_iters = max(10, a.train_iters // 50)
    args.lr_wsd_decay_iters = 0
    args.micro_batch_size = a.micro_batch_size
    args.num_val_windows = a.num_val_windows
    args.threads = a.threads
    args.log_interval = 0
    args.quiet = True
    for k, v in over.items():
        setattr(args, k, v)
    return args


def bar(desc: str, total: int):
    """A tqdm bar on stderr (shown on a terminal only, so logs and tests stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step" if total > 50 else "it", file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)


def train_with_bar(args, desc: str, hook=None, steps: int | None = None) -> dict:
    from megatron_pma.training.tiny_gpt import train

    with bar(desc, steps or args.train_iters) as b:
        return train(args, hook=hook, step_callback=lambda *_: b.update(1))


def _eval_model(a, seed: int):
    """The model to load checkpoints into (``train`` tears megatron's parallel state down: set it up)."""
    from megatron_pma.training.tiny_gpt import build_model, setup_distributed

    args = train_args(a, seed, None)
    setup_distributed(args)  # the demo's process group exists: only the model-parallel state is made
    return args, build_model(args)


def evaluate_all(a, seed: int, paths: list, desc: str) -> list[float]:
    from megatron_pma.training.tiny_gpt import evaluate, load_checkpoint

    args, model = _eval_model(a, seed)
    out = []
    with bar(desc, len(paths)) as b:
        for p in paths:
            load_checkpoint(args, Path(p), model, None, load_optim=False)
            out.append(evaluate(model, args))
            b.update(1)
    return out


def checkpoint_evaluator(a, seed: int):
    """``path -> held-out loss`` for the sweep (one model, reloaded per checkpoint)."""
    from megatron_pma.training.tiny_gpt import evaluate, load_checkpoint

    args, model = _eval_model(a, seed)

    def score(path) -> float:
        load_checkpoint(args, Path(path), model, None, load_optim=False)
        return evaluate(model, args)

    return score


def _pick(seq, k):
    if len(seq) <= k:
        return list(seq)
    if k <= 1:
        return list(seq[-1:])
    idx = sorted({round(i * (len(seq) - 1) / (k - 1)) for i in range(k)})
    return [seq[i] for i in idx]


def pma(a, seed: int, run_dir: Path, work: Path, log) -> dict:
    """Constant-LR run with the hook (SMA) on; annealed branch; every other method merged over the
    same final window; held-out loss of each, and of checkpoints / hook merges along the run."""
    from megatron_pma import merge_checkpoints
    from megatron_pma.layouts import list_checkpoints, select_window
    from megatron_pma.training import PMAHook
    from megatron_pma.training.tiny_gpt import checkpoint_name

    T, S, N = a.train_iters, a.save_interval, a.num_models
    ann_dir, mrg_dir = work / "annealed", work / "merges"
    timings = {}
    t0 = time.perf_counter()
    hook = PMAHook(run_dir, N, method="sma", optimizer="drop")
    summary = train_with_bar(train_args(a, seed, run_dir), f"seed {seed}: train (LR {a.lr:g}, hook on)", hook)
    timings["train_s"] = summary["train_seconds"]
    hook.close()
    timings["hook_wait_s"] = time.perf_counter() - t0 - summary["train_seconds"]
    merged = [r for r in hook.results if r.status == "ok"]
    failed = [r for r in hook.results if r.status == "failed"]
    log(f"  seed {seed}: trained {T} steps in {summary['train_seconds']:.1f} s; the hook merged "
        f"{len(merged)} windows into {run_dir / 'pma'} ({sum(r.status == 'skipped' for r in hook.results)} "
        f"skipped, {len(failed)} failed)")
    if failed:
        raise RuntimeError(f"PMA hook merge failed: {failed[0].error}")

    t1 = time.perf_counter()
    branch = min(int(round(0.85 * T / S)) * S, T - S)  # a very short run still anneals over one interval
    train_with_bar(train_args(a, seed, ann_dir, load=str(checkpoint_name(run_dir, branch)),
                              lr_wsd_decay_iters=T - branch, save_interval=T - branch),
                   f"seed {seed}: annealed branch", steps=T - branch)
    timings["anneal_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    window = select_window(run_dir, N)
    final = {"last": checkpoint_name(run_dir, T), "sma": run_dir / "pma" / f"iter_{T:07d}",
             "annealed": checkpoint_name(ann_dir, T)}
    weights = {}
    with bar(f"seed {seed}: merges", len(MERGED_ARMS) - 1) as b:
        for i, m in enumerate(m for m in MERGED_ARMS if m != "sma"):
            (mrg_dir / f"m{i}").mkdir(parents=True, exist_ok=True)
            res = merge_checkpoints(window, mrg_dir / f"m{i}" / f"iter_{T:07d}", method=m, alpha=a.alpha,
                                    progress=False, fsync=False)
            final[m], weights[m] = res.output, [round(w, 6) for w in res.weights]
            b.update(1)
    timings["final_merges_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    ckpts = [it for it, _ in list_checkpoints(run_dir)]
    merges = sorted(int(Path(r.output).name[5:]) for r in merged)
    curve_ckpt, curve_pma = _pick(ckpts, a.curve_points), _pick(merges, a.curve_points)
    paths = [final[m] for m in PMA_ARMS] + [checkpoint_name(run_dir, i) for i in curve_ckpt] + \
            [run_dir / "pma" / f"iter_{i:07d}" for i in curve_pma]
    losses = evaluate_all(a, seed, paths, f"seed {seed}: evaluation")
    timings["eval_s"] = time.perf_counter() - t3
    rest = losses[len(PMA_ARMS):]
    return {
        "val_loss": dict(zip(PMA_ARMS, losses[: len(PMA_ARMS)])),
        "window": [int(Path(p).name[5:]) for p in window],
        "weights": weights,
        "anneal_branch_iteration": branch,
        "curve": {"last": list(zip(curve_ckpt, rest[: len(curve_ckpt)])),
                  "pma_sma": list(zip(curve_pma, rest[len(curve_ckpt):]))},
        "hook": {"merges": len(merged), "skipped": sum(r.status == "skipped" for r in hook.results),
                 "mean_merge_s": statistics.mean(r.seconds for r in merged) if merged else None},
        "timings": timings,
    }


def lawa(a, seed: int, lr: float, run_dir: Path | None, work: Path) -> dict:
    """LAWA (uniform average of the last N saves) vs the last checkpoint of a constant-LR run at
    ``lr``; ``run_dir``: an existing run at that LR (the PMA run) instead of training one."""
    from megatron_pma import merge_checkpoints
    from megatron_pma.layouts import select_window
    from megatron_pma.training.tiny_gpt import checkpoint_name

    T = a.train_iters
    t0 = time.perf_counter()
    if run_dir is None:
        run_dir = work / f"lawa-lr{lr:g}"
        train_with_bar(train_args(a, seed, run_dir, lr=lr), f"seed {seed}: LAWA run at LR {lr:g}")
    out = work / f"lawa-lr{lr:g}-merged" / f"iter_{T:07d}"
    out.parent.mkdir(parents=True, exist_ok=True)
    merge_checkpoints(select_window(run_dir, a.num_models), out, method="lawa", progress=False, fsync=False)
    last, merged = evaluate_all(a, seed, [checkpoint_name(run_dir, T), out], f"seed {seed}: LAWA evaluation")
    return {"lr": lr, "last": last, "lawa": merged, "gain": last - merged, "seconds": time.perf_counter() - t0}


def pma_init(a, seed: int, run_dir: Path) -> dict:
    """Continue training from the hook's final merge vs from the last checkpoint: weights only,
    fresh optimizer, same (unseen-order) data and LR for both; per-step loss and GradNorm."""
    from megatron_pma.training.tiny_gpt import checkpoint_name

    T = a.train_iters
    start = {"merged": run_dir / "pma" / f"iter_{T:07d}", "last": checkpoint_name(run_dir, T)}
    out = {}
    for arm, ckpt in start.items():
        args = train_args(a, seed, None, load=str(ckpt), finetune=True, train_iters=a.init_iters,
                          lr_warmup_iters=a.init_warmup, data_seed=seed + 1000, save_interval=0)
        s = train_with_bar(args, f"seed {seed}: PMA-init from {arm}")
        losses = [l for _, l in s["losses"]]
        gnorms = [g for _, g in s["grad_norms"]]
        out[arm] = {"initial_val_loss": s["initial_val_loss"], "final_val_loss": s["val_loss"],
                    "mean_train_loss": statistics.fmean(losses), "mean_grad_norm": statistics.fmean(gnorms),
                    "max_grad_norm": max(gnorms), "grad_norm_spikes": stats.spikes(gnorms),
                    "loss": losses, "grad_norm": gnorms, "seconds": s["train_seconds"]}
    return out


def remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
