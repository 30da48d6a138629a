"""``megatron-pma demo``: PMA on a real (tiny) Megatron-Core pretraining run, on CPU.

What it does, per seed:

1. trains a 2-layer, hidden-64 byte-level GPT (megatron-core ``GPTModel``) on Shakespeare at a
   constant, stable-phase learning rate (WSD without the decay), saving a Megatron checkpoint every
   ``--save-interval`` steps, with :class:`megatron_pma.training.PMAHook` merging the newest
   ``--num-models`` checkpoints (SMA) in the background after every save;
2. branches the reference "annealed" run: restart from the checkpoint at 85% of the run with its
   optimizer state and decay the LR linearly to 0 over the last 15%;
3. merges the final window with EMA and WMA as well (the real engine, ``merge_checkpoints``);
4. evaluates the held-out loss (fixed windows of four held-out plays) of the last checkpoint, the
   SMA / EMA / WMA merges and the annealed branch, and of the checkpoints and hook merges along
   the run.

Writes ``<out>/results.json`` and ``<out>/val_loss.png``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

METHODS = ("last", "sma", "ema", "wma", "annealed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short run: 1000 steps of 8 x 64 bytes, checkpoint "
                        "every 20 (about 40 s on an idle 2-core machine)")
    parser.add_argument("--out", default="./pma-demo", help="output directory (default ./pma-demo)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (default 1); results are averaged")
    parser.add_argument("--train-iters", type=int, default=None, help="default 3000 (--quick: 1000)")
    parser.add_argument("--save-interval", type=int, default=None, help="default 50 (--quick: 20)")
    parser.add_argument("--num-models", type=int, default=10, help="N, checkpoints per merge (default 10)")
    parser.add_argument("--lr", type=float, default=1e-2, help="stable-phase learning rate (default 1e-2)")
    parser.add_argument("--alpha", type=float, default=0.2, help="EMA alpha (default 0.2)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences of 64 bytes per step "
                        "(default 16; --quick: 8)")
    parser.add_argument("--num-val-windows", type=int, default=512)
    parser.add_argument("--curve-points", type=int, default=None,
                        help="checkpoints and merges evaluated for the plot (default 12; --quick: 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them at the end)")


def _train_args(a, seed: int, save: Path, **over) -> argparse.Namespace:
    from megatron_pma.training.tiny_gpt import parse_args

    args = parse_args([])
    args.seed = seed
    args.save = str(save)
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


def _pick(seq, k):
    if len(seq) <= k:
        return list(seq)
    if k <= 1:
        return list(seq[-1:])
    idx = sorted({round(i * (len(seq) - 1) / (k - 1)) for i in range(k)})
    return [seq[i] for i in idx]


def run_seed(a, seed: int, root: Path, log) -> dict:
    from megatron_pma.checkpoint.discovery import list_checkpoints, select_window
    from megatron_pma.merge import merge_checkpoints
    from megatron_pma.training import PMAHook
    from megatron_pma.training.tiny_gpt import checkpoint_name, evaluate_checkpoints, train

    T, S, N = a.train_iters, a.save_interval, a.num_models
    run_dir, ann_dir, mrg_dir = root / "run", root / "annealed", root / "merges"
    for d in (run_dir, ann_dir, mrg_dir):
        shutil.rmtree(d, ignore_errors=True)
    timings = {}

    # 1. constant-LR run with the hook on
    t0 = time.perf_counter()
    hook = PMAHook(run_dir, N, method="sma", optimizer="drop")
    summary = train(_train_args(a, seed, run_dir), hook=hook)
    timings["train_s"] = summary["train_seconds"]
    hook.close()
    timings["hook_wait_s"] = time.perf_counter() - t0 - summary["train_seconds"]
    merged = [r for r in hook.results if r.status == "ok"]
    failed = [r for r in hook.results if r.status == "failed"]
    log(f"  seed {seed}: trained {T} steps in {summary['train_seconds']:.1f} s; hook merged "
        f"{len(merged)} windows ({sum(r.status == 'skipped' for r in hook.results)} skipped, {len(failed)} failed)")
    if failed:
        raise RuntimeError(f"PMA hook merge failed: {failed[0].error}")

    # 2. annealed reference branch from the 85% checkpoint, with its optimizer
    t1 = time.perf_counter()
    branch = int(round(0.85 * T / S)) * S
    train(_train_args(a, seed, ann_dir, load=str(checkpoint_name(run_dir, branch)),
                      lr_wsd_decay_iters=T - branch, save_interval=T - branch))
    timings["anneal_s"] = time.perf_counter() - t1

    # 3. EMA / WMA merges of the same final window
    t2 = time.perf_counter()
    window = select_window(run_dir, N)
    final = {"last": checkpoint_name(run_dir, T), "sma": run_dir / "pma" / f"iter_{T:07d}",
             "annealed": checkpoint_name(ann_dir, T)}
    for m in ("ema", "wma"):
        (mrg_dir / m).mkdir(parents=True, exist_ok=True)
        final[m] = merge_checkpoints(window, mrg_dir / m / f"iter_{T:07d}", method=m, alpha=a.alpha,
                                     progress=False).output
    timings["final_merges_s"] = time.perf_counter() - t2

    # 4. evaluate
    t3 = time.perf_counter()
    ev_args = _train_args(a, seed, run_dir)
    ckpts = [it for it, _ in list_checkpoints(run_dir)]
    merges = sorted(int(Path(r.output).name[5:]) for r in merged)
    curve_ckpt = _pick(ckpts, a.curve_points)
    curve_pma = _pick(merges, a.curve_points)
    paths = [final[m] for m in METHODS] + [checkpoint_name(run_dir, i) for i in curve_ckpt] + \
            [run_dir / "pma" / f"iter_{i:07d}" for i in curve_pma]
    losses = evaluate_checkpoints(ev_args, paths)
    timings["eval_s"] = time.perf_counter() - t3
    val = dict(zip(METHODS, losses[: len(METHODS)]))
    rest = losses[len(METHODS):]
    return {
        "seed": seed,
        "val_loss": val,
        "window": [int(Path(p).name[5:]) for p in window],
        "anneal_branch_iteration": branch,
        "curve": {"last": list(zip(curve_ckpt, rest[: len(curve_ckpt)])),
                  "pma_sma": list(zip(curve_pma, rest[len(curve_ckpt):]))},
        "hook": {"merges": len(merged), "skipped": sum(r.status == "skipped" for r in hook.results),
                 "mean_merge_s": statistics.mean(r.seconds for r in merged) if merged else None},
        "timings": timings,
    }


def _plot(per_seed, path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, r in enumerate(per_seed):
        kw = {"label": None} if i else {}
        c = r["curve"]
        ax.plot(*zip(*c["last"]), "o-", color="tab:gray", alpha=0.8, ms=3,
                **({"label": "last checkpoint"} if not i else kw))
        ax.plot(*zip(*c["pma_sma"]), "s-", color="tab:blue", alpha=0.8, ms=3,
                **({"label": f"PMA hook merge (SMA, N={a.num_models})"} if not i else kw))
        T = a.train_iters
        ax.plot([T], [r["val_loss"]["annealed"]], "*", color="tab:red", ms=10,
                **({"label": "annealed branch (LR decay over last 15%)"} if not i else kw))
        ax.plot([T, T], [r["val_loss"]["ema"], r["val_loss"]["wma"]], "x", color="tab:green", ms=6,
                **({"label": "final EMA / WMA merges"} if not i else kw))
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"PMA on a tiny Megatron-Core GPT (constant LR {a.lr:g}, {len(per_seed)} seed(s))")
    lo = min(min(l for _, l in r["curve"]["pma_sma"] + r["curve"]["last"][len(r["curve"]["last"]) // 3:])
             for r in per_seed)
    hi = max(max(l for _, l in r["curve"]["last"][len(r["curve"]["last"]) // 3:]) for r in per_seed)
    ax.set_ylim(min(lo, min(r["val_loss"]["annealed"] for r in per_seed)) - 0.03, hi + 0.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    t_all = time.perf_counter()
    from megatron_pma.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    import warnings

    for cat in (UserWarning, FutureWarning, DeprecationWarning):  # megatron/torch CPU-fallback chatter
        warnings.filterwarnings("ignore", category=cat)
    from megatron_pma.training.tiny_gpt import load_corpus, setup_distributed, teardown

    if args.train_iters is None:
        args.train_iters = 1000 if args.quick else 3000
    if args.save_interval is None:
        args.save_interval = 20 if args.quick else 50
    if args.micro_batch_size is None:
        args.micro_batch_size = 8 if args.quick else 16
    if args.curve_points is None:
        args.curve_points = 6 if args.quick else 12
    T, S, N = args.train_iters, args.save_interval, args.num_models
    if T % S:
        print(f"error: --train-iters {T} must be a multiple of --save-interval {S}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    _, _, source = load_corpus()
    log(f"PMA demo: tiny GPT (megatron-core GPTModel, 2 layers, hidden 64, byte-level {source}), "
        f"{T} steps at constant LR {args.lr:g}, checkpoint every {S}, merge N={N} "
        f"(window {N * S} steps = {100 * N * S / T:.0f}% of the run), seeds {seeds}")
    if N * S > 0.25 * T:
        log("  note: a window longer than ~20% of the run makes the merge worse than the last checkpoint "
            "at this scale")

    ns = argparse.Namespace(backend=None, tensor_model_parallel_size=1)
    created = setup_distributed(ns)  # one process (world size 1, gloo) for the whole demo
    per_seed = []
    try:
        for seed in seeds:
            per_seed.append(run_seed(args, seed, out / f"seed{seed}", log))
    finally:
        teardown(created)
        if not args.keep:
            for seed in seeds:
                shutil.rmtree(out / f"seed{seed}", ignore_errors=True)

    mean = {m: statistics.mean(r["val_loss"][m] for r in per_seed) for m in METHODS}
    gain = {m: mean["last"] - mean[m] for m in METHODS if m != "last"}
    anneal_gain = gain["annealed"]
    recovered = {m: (gain[m] / anneal_gain if anneal_gain > 0 else None) for m in ("sma", "ema", "wma")}
    beats = {m: all(r["val_loss"][m] < r["val_loss"]["last"] for r in per_seed) for m in ("sma", "ema", "wma")}

    header = f"{'':>10}" + "".join(f"{m:>10}" for m in METHODS)
    log("\nheld-out loss (nats/byte), lower is better")
    log(header)
    for r in per_seed:
        log(f"{'seed ' + str(r['seed']):>10}" + "".join(f"{r['val_loss'][m]:10.4f}" for m in METHODS))
    if len(per_seed) > 1:
        log(f"{'mean':>10}" + "".join(f"{mean[m]:10.4f}" for m in METHODS))
    log(f"{'vs last':>10}{'':>10}" + "".join(f"{-gain[m]:+10.4f}" for m in METHODS[1:]))
    log("share of the anneal gain recovered by merging: " +
        ", ".join(f"{m.upper()} {100 * v:.0f}%" for m, v in recovered.items() if v is not None))
    log("merges beat the last checkpoint in every seed: " + ", ".join(f"{m.upper()} {'yes' if v else 'NO'}"
                                                                       for m, v in beats.items()))
    results = {
        "val_loss": mean,
        "gain_vs_last": gain,
        "anneal_gain_recovered": recovered,
        "merges_beat_last_every_seed": beats,
        "per_seed": per_seed,
        "settings": {"train_iters": T, "save_interval": S, "num_models": N, "lr": args.lr,
                     "ema_alpha": args.alpha, "micro_batch_size": args.micro_batch_size, "seq_length": 64,
                     "model": "GPTModel 2 layers, hidden 64, 4 heads, vocab 256, tied embeddings",
                     "data": source, "val_windows": args.num_val_windows, "seeds": seeds,
                     "quick": bool(args.quick),
                     "annealed": "restart from the 85% checkpoint with its optimizer, LR linear to 0 over the last 15%"},
        "seconds": time.perf_counter() - t_all,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(per_seed, out / "val_loss.png", args)
    log(f"\nwrote {out / 'results.json'} and {out / 'val_loss.png'} ({results['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-pma demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
