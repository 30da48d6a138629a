"""``megatron-pma demo``: the papers' claims measured on a real (tiny) Megatron-Core pretraining run, on CPU.

Per seed (a 2-layer, hidden-64 byte-level megatron-core ``GPTModel`` at a constant, stable-phase LR,
a Megatron checkpoint every ``--save-interval`` steps, :class:`megatron_pma.training.PMAHook`
merging the newest ``--num-models`` checkpoints (SMA) after every save):

* **PMA** (arXiv 2505.12082) and **WSM** (arXiv 2507.17634): the last checkpoint vs SMA / EMA / WMA
  and WSM (each decay) merges of the same final window vs an annealed branch (restart from the 85 %
  checkpoint with its optimizer, LR decayed linearly to 0 over the last 15 %);
* **LAWA** (arXiv 2306.03241): the gain of merging over the last checkpoint at three LRs;
* **PMA-init**: continued training from the final merge vs from the last checkpoint (fresh optimizer,
  same data, same LR): loss and GradNorm per step;
* **sweep**: ``megatron-pma sweep`` over the last seed's run (window x N x method).

Each claim is a section of ``<out>/results.json`` with paired differences over seeds and their standard
errors, and a PNG. The last seed's run stays in ``<out>/run`` (a Megatron save dir, hook merges in
``<out>/run/pma``) unless ``--no-keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

DEFAULT_SWEEP_METHODS = "sma,ema,wsm:linear,wsm:cosine,wsm:inv-sqrt,wsm:minus-sqrt"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 1000 steps of 8 x 64 bytes, checkpoint every 20, no LAWA LR runs, "
                             "short PMA-init and sweep (about a minute on an idle 2-core machine)")
    parser.add_argument("--out", default="./pma-demo", help="output directory (default ./pma-demo)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3; --quick: 1)")
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
    parser.add_argument("--lawa-lrs", type=_floats, default=None,
                        help="LRs of the LAWA claim (default 1e-3,3e-3,1e-2; --quick: none, '' skips)")
    parser.add_argument("--init-iters", type=int, default=None,
                        help="PMA-init: steps of continued training (default 15%% of --train-iters; 0 skips)")
    parser.add_argument("--init-warmup", type=int, default=10, help="PMA-init: LR warmup steps (default 10)")
    parser.add_argument("--sweep-windows", type=_floats, default=None,
                        help="sweep: window lengths in iterations (default 5/15/30/50%% of the run; --quick: "
                             "10/20/40%%; '' skips)")
    parser.add_argument("--sweep-num-models", default="4,10", help="sweep: N values (default 4,10)")
    parser.add_argument("--sweep-methods", default=None,
                        help=f"sweep: methods (default {DEFAULT_SWEEP_METHODS}; --quick: sma,wsm:linear,wsm:minus-sqrt)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    parser.add_argument("--no-keep", action="store_true",
                        help="delete the checkpoints at the end (default: keep the last seed's run in OUT/run)")
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # the default now; accepted


def _defaults(a) -> None:
    q = a.quick
    T = a.train_iters = a.train_iters or (1000 if q else 3000)
    a.save_interval = a.save_interval or (20 if q else 50)
    a.micro_batch_size = a.micro_batch_size or (8 if q else 16)
    a.curve_points = a.curve_points or (6 if q else 12)
    a.seeds = [int(s) for s in str(a.seeds or ("1" if q else "1,2,3")).split(",") if s.strip()]
    if a.lawa_lrs is None:
        a.lawa_lrs = [] if q else [1e-3, 3e-3, 1e-2]
    if a.init_iters is None:
        a.init_iters = max(20, round(0.15 * T / 10) * 10) if not q else 100
    if a.sweep_windows is None:
        a.sweep_windows = [round(f * T / a.save_interval) * a.save_interval
                           for f in ((0.1, 0.2, 0.4) if q else (0.05, 0.15, 0.3, 0.5))]
    a.sweep_num_models = [int(x) for x in str(a.sweep_num_models).split(",") if x.strip()]
    a.sweep_methods = a.sweep_methods or ("sma,wsm:linear,wsm:minus-sqrt" if q else DEFAULT_SWEEP_METHODS)


def _cli_prefix() -> str:
    """How the user would call this install's CLI: the venv's megatron-pma, relative when nearby."""
    exe = Path(sys.executable).parent / "megatron-pma"
    if not exe.exists():
        return f"{shlex.quote(sys.executable)} -m megatron_pma"
    rel = os.path.relpath(exe)
    return shlex.quote(rel if not rel.startswith("../..") else str(exe))


def _summaries(per_seed: list[dict], a) -> dict:
    from megatron_pma.demo import stats
    from megatron_pma.demo.experiments import MERGED_ARMS, PMA_ARMS

    out = {}
    col = lambda m: [r["pma"]["val_loss"][m] for r in per_seed]  # noqa: E731
    mean = {m: statistics.fmean(col(m)) for m in PMA_ARMS}
    vs_last = {m: stats.paired(col(m), col("last")) for m in PMA_ARMS if m != "last"}
    vs_ann = {m: stats.paired(col(m), col("annealed")) for m in MERGED_ARMS}
    anneal_gain = -vs_last["annealed"]["mean"]
    out["pma"] = {
        "val_loss": mean, "vs_last": vs_last, "vs_annealed": vs_ann,
        "anneal_gain_recovered": {m: (-vs_last[m]["mean"] / anneal_gain if anneal_gain > 0 else None)
                                  for m in MERGED_ARMS},
        "within_noise_of_annealed": {m: stats.within_noise(vs_ann[m]) for m in MERGED_ARMS},
        "beats_last_every_seed": {m: all(d < 0 for d in vs_last[m]["per_seed"]) for m in MERGED_ARMS},
        "window": per_seed[-1]["pma"]["window"], "weights": per_seed[-1]["pma"]["weights"],
        "note": "within_noise_of_annealed: mean(merged - annealed) <= 2 paired standard errors",
    }
    if a.lawa_lrs:
        rows = []
        for i, lr in enumerate(a.lawa_lrs):
            last = [r["lawa"][i]["last"] for r in per_seed]
            merged = [r["lawa"][i]["lawa"] for r in per_seed]
            rows.append({"lr": lr, "last": statistics.fmean(last), "lawa": statistics.fmean(merged),
                         "gain": stats.paired(last, merged)})
        lo, hi = min(range(len(rows)), key=lambda i: a.lawa_lrs[i]), max(range(len(rows)), key=lambda i: a.lawa_lrs[i])
        growth = stats.paired(rows[hi]["gain"]["per_seed"], rows[lo]["gain"]["per_seed"])
        out["lawa"] = {"by_lr": rows, "gain_highest_minus_lowest_lr": growth,
                       "gain_grows_with_lr": all(x["gain"]["mean"] < y["gain"]["mean"] for x, y in
                                                 zip(sorted(rows, key=lambda r: r["lr"]),
                                                     sorted(rows, key=lambda r: r["lr"])[1:]))}
    if a.init_iters:
        keys = ("initial_val_loss", "final_val_loss", "mean_train_loss", "mean_grad_norm", "max_grad_norm",
                "grad_norm_spikes")
        out["pma_init"] = {"steps": a.init_iters, "lr": a.lr, "warmup": a.init_warmup, "metrics": {
            k: {"merged": statistics.fmean(r["pma_init"]["merged"][k] for r in per_seed),
                "last": statistics.fmean(r["pma_init"]["last"][k] for r in per_seed),
                "merged_minus_last": stats.paired([r["pma_init"]["merged"][k] for r in per_seed],
                                                  [r["pma_init"]["last"][k] for r in per_seed])} for k in keys},
            "note": "grad_norm_spikes: steps with GradNorm > 2x the median of the previous 20"}
    return out


def _report(per_seed: list[dict], s: dict, a, log) -> None:
    from megatron_pma.demo import stats
    from megatron_pma.demo.experiments import MERGED_ARMS, PMA_ARMS

    p = s["pma"]
    log(f"\nPMA / WSM: held-out loss (nats/byte), lower is better; window = iterations {p['window']}")
    log(f"{'':>16}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in per_seed)
        + f"{'mean':>10}{'vs last (paired)':>22}{'vs annealed':>22}{'of anneal gain':>16}")
    for m in PMA_ARMS:
        row = f"{m:>16}" + "".join(f"{r['pma']['val_loss'][m]:10.4f}" for r in per_seed) + f"{p['val_loss'][m]:10.4f}"
        row += f"{stats.fmt(p['vs_last'][m]) if m != 'last' else '':>22}"
        row += f"{stats.fmt(p['vs_annealed'][m]) if m in MERGED_ARMS else '':>22}"
        rec = p["anneal_gain_recovered"].get(m)
        row += f"{f'{100 * rec:.0f}%' if rec is not None else '':>16}"
        log(row)
    best = min(MERGED_ARMS, key=lambda m: p["val_loss"][m])
    noise = p["within_noise_of_annealed"][best]
    log(f"best merge: {best} ({stats.fmt(p['vs_annealed'][best])} vs annealed: "
        + ("within 2 SE of the annealed branch" if noise else "NOT within 2 SE of the annealed branch" if noise is False
           else "one seed, no noise estimate") + ")")
    log("merges beat the last checkpoint in every seed: "
        + ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in p["beats_last_every_seed"].items()))
    if "lawa" in s:
        log("\nLAWA: gain of merging (last N, uniform) over the last checkpoint, by LR")
        for r in s["lawa"]["by_lr"]:
            log(f"  LR {r['lr']:<8g} last {r['last']:.4f}  LAWA {r['lawa']:.4f}  gain {stats.fmt(r['gain'])}")
        g = s["lawa"]["gain_highest_minus_lowest_lr"]
        log(f"  gain(highest LR) - gain(lowest LR): {stats.fmt(g)}; grows with the LR: "
            f"{'yes' if s['lawa']['gain_grows_with_lr'] else 'NO'}")
    if "pma_init" in s:
        log(f"\nPMA-init: {a.init_iters} steps of continued training at LR {a.lr:g}, merged-init vs last-init")
        for k, v in s["pma_init"]["metrics"].items():
            log(f"  {k:>17}: merged {v['merged']:9.4f}  last {v['last']:9.4f}  merged - last "
                f"{stats.fmt(v['merged_minus_last'])}")


def _sweep(a, seed: int, run_dir: Path, work: Path, out: Path, log) -> dict:
    from megatron_pma.commands import sweep as sw
    from megatron_pma.demo.experiments import checkpoint_evaluator

    methods = [m for m in a.sweep_methods.split(",") if m.strip()]
    res = sw.sweep(run_dir, checkpoint_evaluator(a, seed), windows=a.sweep_windows, num_models=a.sweep_num_models,
                   methods=methods, scratch=work / "sweep", alpha=a.alpha, progress=sys.stderr.isatty())
    sw.heatmap(res, out / "sweep.png")
    log(f"\nsweep over the seed-{seed} run (held-out loss; windows in iterations):")
    log(sw.table(res))
    d = res.to_json()
    d["cli"] = (f"{_cli_prefix()} sweep --save-dir {shlex.quote(str(run_dir))} --windows "
                f"{','.join(f'{w:g}' for w in a.sweep_windows)} --num-models "
                f"{','.join(map(str, a.sweep_num_models))} --methods {a.sweep_methods} --eval-cmd 'python my_eval.py {{ckpt}}'")
    return d


def run(args: argparse.Namespace) -> int:
    t_all = time.perf_counter()
    _defaults(args)
    T, S, N = args.train_iters, args.save_interval, args.num_models
    if T % S:
        print(f"error: --train-iters {T} must be a multiple of --save-interval {S}", file=sys.stderr)
        return 2
    from megatron_pma.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    import warnings

    for cat in (UserWarning, FutureWarning, DeprecationWarning):  # megatron/torch CPU-fallback chatter
        warnings.filterwarnings("ignore", category=cat)
    from megatron_pma.demo import experiments as ex
    from megatron_pma.demo import plots
    from megatron_pma.training.tiny_gpt import load_corpus, setup_distributed, teardown

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    _, _, source = load_corpus()
    log(f"PMA demo: tiny GPT (megatron-core GPTModel, 2 layers, hidden 64, byte-level {source}), "
        f"{T} steps at constant LR {args.lr:g}, checkpoint every {S}, merge N={N} "
        f"(window {(N - 1) * S} steps = {100 * (N - 1) * S / T:.0f}% of the run), seeds {args.seeds}"
        + (f"; LAWA at LRs {args.lawa_lrs}" if args.lawa_lrs else "")
        + (f"; PMA-init {args.init_iters} steps" if args.init_iters else ""))
    if N * S > 0.25 * T:
        log("  note: a window longer than ~20% of the run makes the merge worse than the last checkpoint "
            "at this scale")

    ns = argparse.Namespace(backend=None, tensor_model_parallel_size=1)
    created = setup_distributed(ns)  # one process (world size 1, gloo) for the whole demo
    per_seed, sweep_result = [], None
    run_dir = out / "run"
    try:
        for seed in args.seeds:
            last_seed = seed == args.seeds[-1]
            work = out / "work" / f"seed{seed}"
            seed_run = run_dir if last_seed else work / "run"
            ex.remove(seed_run, work)
            r = {"seed": seed, "pma": ex.pma(args, seed, seed_run, work, log)}
            r["curve"], r["val_loss"] = r["pma"]["curve"], r["pma"]["val_loss"]
            t0 = time.perf_counter()
            r["lawa"] = [ex.lawa(args, seed, lr, seed_run if lr == args.lr else None, work) for lr in args.lawa_lrs]
            r["pma"]["timings"]["lawa_s"] = time.perf_counter() - t0
            if args.init_iters:
                t0 = time.perf_counter()
                r["pma_init"] = ex.pma_init(args, seed, seed_run)
                r["pma"]["timings"]["pma_init_s"] = time.perf_counter() - t0
            if last_seed and args.sweep_windows:
                t0 = time.perf_counter()
                sweep_result = _sweep(args, seed, seed_run, work, out, log)
                r["pma"]["timings"]["sweep_s"] = time.perf_counter() - t0
            log(f"  seed {seed} done: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["pma"]["timings"].items()))
            per_seed.append(r)
            ex.remove(work)
    finally:
        teardown(created)
        ex.remove(out / "work")
        if args.no_keep:
            ex.remove(run_dir)

    summary = _summaries(per_seed, args)
    _report(per_seed, summary, args, log)
    results = {
        **summary,
        "sweep": sweep_result,
        "val_loss": summary["pma"]["val_loss"],
        "per_seed": [{k: v for k, v in r.items() if k not in ("curve", "val_loss")} for r in per_seed],
        "settings": {"train_iters": T, "save_interval": S, "num_models": N, "lr": args.lr,
                     "ema_alpha": args.alpha, "micro_batch_size": args.micro_batch_size, "seq_length": 64,
                     "model": "GPTModel 2 layers, hidden 64, 4 heads, vocab 256, tied embeddings",
                     "data": source, "val_windows": args.num_val_windows, "seeds": args.seeds,
                     "quick": bool(args.quick), "lawa_lrs": args.lawa_lrs, "init_iters": args.init_iters,
                     "annealed": "restart from the 85% checkpoint with its optimizer, LR linear to 0 over the last 15%"},
        "seconds": time.perf_counter() - t_all,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    pngs = ["val_loss.png", "pma.png"]
    plots.val_loss(per_seed, ex.PMA_ARMS, out / "val_loss.png", args)
    plots.pma_bars(summary["pma"], out / "pma.png")
    if "lawa" in summary:
        plots.lawa(summary["lawa"], out / "lawa.png")
        pngs.append("lawa.png")
    if "pma_init" in summary:
        plots.pma_init([r["pma_init"] for r in per_seed], out / "pma_init.png")
        pngs.append("pma_init.png")
    if sweep_result is not None:
        pngs.append("sweep.png")
    log(f"\nwrote {out / 'results.json'} and {', '.join(pngs)} ({results['seconds']:.0f} s)")
    if not args.no_keep:
        cli, run_q = _cli_prefix(), shlex.quote(str(run_dir))
        log(f"\nThe last run's checkpoints are in {run_dir} (iter_XXXXXXX, tracker; the hook's merges in "
            f"{run_dir / 'pma'}). Try:\n"
            f"  {cli} inspect {run_q}\n"
            f"  {cli} merge --save-dir {run_q} --num-models {N} --method wsm --decay linear "
            f"-o {shlex.quote(str(out / 'wsm-merge'))}\n"
            f"  {cli} watch --save-dir {run_q} --num-models {N} --method ema "
            f"--output-root {shlex.quote(str(out / 'ema-merges'))} --once --backfill")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-pma demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
