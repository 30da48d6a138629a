"""`megatron-pma sweep`: which window, how many checkpoints, which weights? Measure them.

    megatron-pma sweep --save-dir SAVE --windows 200,500,1000 --num-models 4,8 \\
        --methods sma,ema,wsm:linear,wsm:minus-sqrt --eval-cmd 'python my_eval.py {ckpt}' --out SWEEP

For every (window length, number of checkpoints, method) the window ending at the newest
checkpoint is picked from the save dir (``layouts.select_window``, checkpoints
``window / (n - 1)`` iterations or tokens apart), merged into a scratch folder with the public
:func:`megatron_pma.merge_checkpoints`, evaluated, and removed before the next one. The newest
checkpoint itself is evaluated too (the "last" baseline). The evaluator is a shell command
whose stdout's last line is a number (lower is better; ``{ckpt}``, ``{save_dir}``,
``{iteration}`` are filled in), or any Python callable ``path -> float`` (:func:`sweep`).
A failed evaluation or a window that does not fit is recorded, never fatal.

Writes ``sweep.json`` and ``sweep.png`` (loss per method x window) into ``--out``, prints a table;
``--keep-best OUT`` merges the winning combination again into ``OUT`` (published atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from megatron_pma import schedules
from megatron_pma.errors import PMAError

DEFAULT_METHODS = ("sma", "ema", "wma") + tuple(f"wsm:{d}" for d in schedules.DECAYS)
UNITS = ("iterations", "tokens")
NO_FIT = "window does not fit"


@dataclass
class Trial:
    method: str
    window: float
    num_models: int
    iterations: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    loss: float | None = None
    error: str | None = None
    merge_s: float | None = None
    eval_s: float | None = None


@dataclass
class SweepResult:
    save_dir: str
    unit: str
    last: Trial
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.loss is not None]
        return min(ok, key=lambda t: t.loss) if ok else None

    def to_json(self) -> dict:
        best = self.best
        return {"save_dir": self.save_dir, "unit": self.unit, "last": asdict(self.last),
                "trials": [asdict(t) for t in self.trials], "best": asdict(best) if best else None,
                "best_gain_vs_last": (self.last.loss - best.loss
                                      if best and self.last.loss is not None else None)}


# ---------------------------------------------------------------------------------- evaluation

def command_evaluator(template: str, timeout: float | None = None) -> Callable[[Path], float]:
    """An evaluator running ``template`` (``{ckpt}``, ``{save_dir}``, ``{iteration}`` filled in,
    each quoted for the shell); the number on the last line of its stdout is the score."""
    if "{ckpt}" not in template and "{save_dir}" not in template:
        raise PMAError(f"--eval-cmd must name the checkpoint as {{ckpt}} (or {{save_dir}}): {template!r}")

    def evaluate(ckpt: Path) -> float:
        from megatron_pma.checkpoint.discovery import iteration_from_name

        cmd = template.format(ckpt=shlex.quote(str(ckpt)), save_dir=shlex.quote(str(Path(ckpt).parent)),
                              iteration=iteration_from_name(Path(ckpt)))
        try:
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"evaluator timed out after {timeout:g} s") from None
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"evaluator exited with {p.returncode}: {tail[-300:]}")
        lines = p.stdout.strip().splitlines()
        try:
            value = float(lines[-1].split()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"evaluator's last line is not a number: {(lines or [''])[-1][-200:]!r}") from None
        if not math.isfinite(value):
            raise RuntimeError(f"evaluator returned {value}")
        return value

    return evaluate


def _evaluate(evaluator, path: Path, trial: Trial) -> None:
    t0 = time.perf_counter()
    try:
        trial.loss = float(evaluator(path))
        if not math.isfinite(trial.loss):
            raise RuntimeError(f"evaluator returned {trial.loss}")
    except Exception as e:  # a failed evaluation is a result, not the end of the sweep
        trial.loss, trial.error = None, f"{type(e).__name__}: {e}"
    trial.eval_s = time.perf_counter() - t0


# ---------------------------------------------------------------------------------- the sweep

def grid(windows: Sequence[float], num_models: Sequence[int], methods: Sequence[str]) -> list[Trial]:
    """Every (window, N, method), methods innermost; checked before anything runs."""
    for w in windows:
        if not (w > 0 and math.isfinite(w)):
            raise PMAError(f"--windows: a window must be a positive length, got {w:g}")
    for n in num_models:
        if n < 2:
            raise PMAError(f"--num-models: a merge needs at least 2 checkpoints, got {n}")
    specs = [schedules.method_spec(m) for m in methods]
    for m in specs:
        if m == "custom":
            raise PMAError("--methods: 'custom' needs explicit weights; not swept")
        schedules.weights(m, 2)  # unknown method / decay: one clear error now
    return [Trial(m, float(w), int(n)) for w in windows for n in num_models for m in specs]


def _too_short(all_its: list[int], picked: list[int], window: float) -> bool:
    """The newest N consecutive checkpoints already span more than the window: N do not fit in it
    (a pick with gaps is at most one save interval per gap longer than asked: that one counts)."""
    consecutive = all_its[all_its.index(picked[0]):all_its.index(picked[-1]) + 1] == picked
    return consecutive and picked[-1] - picked[0] > window


def sweep(save_dir: str | Path, evaluator: Callable[[Path], float], *, windows: Sequence[float],
          num_models: Sequence[int], methods: Sequence[str] = DEFAULT_METHODS, unit: str = "iterations",
          tokens_per_iter: int | None = None, scratch: str | Path | None = None, alpha: float = 0.2,
          workers: int = 1, progress: bool = False, log: Callable[[str], None] | None = None) -> SweepResult:
    """Merge and evaluate every combination of the grid, one at a time (see the module doc).

    ``evaluator(path) -> float`` scores a checkpoint dir (lower is better); an exception it
    raises is recorded in the trial's ``error``. ``scratch``: where the merges live while they
    are evaluated (default: a temporary folder), each removed right after.
    """
    from megatron_pma import merge_checkpoints
    from megatron_pma.layouts import list_checkpoints, select_window

    if unit not in UNITS:
        raise PMAError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    trials = grid(windows, num_models, methods)
    save_dir = Path(save_dir)
    ckpts = list_checkpoints(save_dir)
    if not ckpts:
        raise PMAError(f"{save_dir}: no complete checkpoint to sweep over")
    last_it, last_path = ckpts[-1]
    all_its = [it for it, _ in ckpts]
    iteration_of = {Path(p): it for it, p in ckpts}  # NeMo 2 names are not iter_XXXXXXX
    own_scratch = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="pma-sweep-")) if own_scratch else Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trials) + 1, desc="sweep", unit="merge", file=sys.stderr)
    try:
        last = Trial("last", 0.0, 1, iterations=[last_it], weights=[1.0])
        _evaluate(evaluator, last_path, last)  # read-only: the evaluator gets the run's own checkpoint
        if bar:
            bar.update()
        for i, t in enumerate(trials):
            interval = t.window / (t.num_models - 1)
            try:
                window = select_window(save_dir, t.num_models, tokens_per_iter=tokens_per_iter,
                                       interval_iters=math.ceil(interval) if unit == "iterations" else None,
                                       interval_tokens=math.ceil(interval) if unit == "tokens" else None)
            except PMAError as e:
                t.error = f"{NO_FIT}: {e}"
            else:
                t.iterations = [iteration_of[Path(p)] for p in window]
                t.inputs = [str(p) for p in window]
            if not t.error and unit == "iterations" and _too_short(all_its, t.iterations, t.window):
                t.error = (f"{NO_FIT}: {t.num_models} checkpoints span at least "
                           f"{t.iterations[-1] - t.iterations[0]} iterations")
            if not t.error:
                out = scratch / f"trial{i:03d}" / f"iter_{t.iterations[-1]:07d}"
                out.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                try:
                    res = merge_checkpoints(window, out, method=t.method, alpha=alpha, progress=False,
                                            fsync=False, workers=workers)
                except PMAError as e:  # e.g. one checkpoint of this window is damaged: the others still run
                    t.error = f"merge failed: {e}"
                else:
                    t.weights = [float(w) for w in res.weights]
                    t.merge_s = time.perf_counter() - t0
                    _evaluate(evaluator, out, t)
                finally:
                    shutil.rmtree(out.parent, ignore_errors=True)
            if log:
                log(f"{t.method:>15}  window {t.window:g} N={t.num_models}: "
                    + (f"{t.loss:.4f}" if t.loss is not None else f"- ({t.error})"))
            if bar:
                bar.update()
    finally:
        if bar:
            bar.close()
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return SweepResult(str(save_dir), unit, last, trials)


def publish_best(result: SweepResult, output: str | Path, *, alpha: float = 0.2,
                 workers: int = 1, force: bool = False):
    """Merge the winning combination again into ``output`` (atomic, like ``merge``)."""
    from megatron_pma import merge_checkpoints

    best = result.best
    if best is None:
        raise PMAError("no merge was evaluated successfully; nothing to keep")
    return merge_checkpoints(best.inputs, output, method=best.method, alpha=alpha, workers=workers, force=force,
                             progress=False)


# ---------------------------------------------------------------------------------- report

def table(result: SweepResult) -> str:
    cols = sorted({(t.window, t.num_models) for t in result.trials})
    methods = list(dict.fromkeys(t.method for t in result.trials))
    cell = {(t.method, t.window, t.num_models): t for t in result.trials}
    unit = "tok" if result.unit == "tokens" else "it"
    head = f"{'method':>16}" + "".join(f"{f'{w:g}{unit}/N={n}':>16}" for w, n in cols)
    lines = [head]
    for m in methods:
        row = []
        for w, n in cols:
            t = cell.get((m, w, n))
            row.append(f"{t.loss:.4f}" if t.loss is not None else "n/a" if t.error.startswith(NO_FIT) else "failed")
        lines.append(f"{m:>16}" + "".join(f"{x:>16}" for x in row))
    last = result.last
    lines.append(f"{'last (' + str(last.iterations[0]) + ')':>16}"
                 + f"{(f'{last.loss:.4f}' if last.loss is not None else 'failed'):>16}")
    best = result.best
    if best is not None:
        gain = f", {result.last.loss - best.loss:+.4f} vs last" if result.last.loss is not None else ""
        lines.append(f"best: {best.method}, window {best.window:g} {result.unit}, N={best.num_models} "
                     f"(iterations {best.iterations}): {best.loss:.4f}{gain}")
    return "\n".join(lines)


def heatmap(result: SweepResult, path: Path) -> bool:
    """Loss per method (rows) x (window, N) (columns); False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = sorted({(t.window, t.num_models) for t in result.trials})
    methods = list(dict.fromkeys(t.method for t in result.trials))
    z = np.full((len(methods), len(cols)), np.nan)
    for t in result.trials:
        if t.loss is not None:
            z[methods.index(t.method), cols.index((t.window, t.num_models))] = t.loss
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.45 * len(methods)))
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis_r", aspect="auto")
    for (r, c), v in np.ndenumerate(z):  # black on the light (low) end of viridis_r, white on the dark end
        dark = not np.isnan(v) and im.norm(v) > 0.5
        ax.text(c, r, "x" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                color="red" if np.isnan(v) else "white" if dark else "black")
    unit = "tokens" if result.unit == "tokens" else "iters"
    ax.set_xticks(range(len(cols)), [f"{w:g} {unit}\nN={n}" for w, n in cols], fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    title = "evaluator score (lower is better; x = failed / does not fit)"
    if result.last.loss is not None:
        title += f"\nlast checkpoint: {result.last.loss:.3f}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------- CLI

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dir", type=Path, required=True, help="Megatron save dir (iter_XXXXXXX + tracker)")
    p.add_argument("--eval-cmd", required=True,
                   help="shell command scoring one checkpoint, e.g. 'python my_eval.py {ckpt}'; its stdout's last "
                        "line is the score (lower is better); {save_dir} and {iteration} are filled in too")
    p.add_argument("--windows", type=_floats, required=True,
                   help="window lengths (oldest to newest checkpoint), comma-separated, e.g. 200,500,1000")
    p.add_argument("--unit", choices=UNITS, default="iterations", help="unit of --windows (default iterations)")
    p.add_argument("--tokens-per-iter", type=int, default=None,
                   help="with --unit tokens: override tokens per iteration (default: from the checkpoint's args)")
    p.add_argument("--num-models", type=_ints, default=[4], help="checkpoints per merge, comma-separated (default 4)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated: {', '.join(m for m in schedules.METHODS if m != 'custom')}, "
                        f"or wsm:DECAY with DECAY one of {', '.join(schedules.DECAYS)} (default: all)")
    p.add_argument("--alpha", type=float, default=0.2, help="EMA alpha (default 0.2)")
    p.add_argument("--out", type=Path, default=Path("sweep"), help="folder for sweep.json and sweep.png (default ./sweep)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where each merge lives while evaluated (default: a temporary folder; must have room for one)")
    p.add_argument("--eval-timeout", type=float, default=None, help="seconds before an evaluation counts as failed")
    p.add_argument("--keep-best", type=Path, default=None, metavar="OUT",
                   help="merge the winner again into OUT (named iter_XXXXXXX it updates its parent's tracker)")
    p.add_argument("--force", action="store_true", help="replace an existing --keep-best output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_pma.checkpoint.publish import write_file_atomic
    from megatron_pma.commands.merge import WORKERS_ENV, auto_workers, parse_workers

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid(args.windows, args.num_models, methods)  # bad grid: exit 2 before anything is written
    evaluator = command_evaluator(args.eval_cmd, args.eval_timeout)
    if not args.save_dir.is_dir():
        raise PMAError(f"{args.save_dir}: no such save directory")
    if args.keep_best is not None and args.keep_best.exists() and not args.force:
        raise PMAError(f"{args.keep_best}: already exists (use --force to replace it)")
    try:  # the same default as merge's --workers
        workers = parse_workers(os.environ.get(WORKERS_ENV) or "auto") or auto_workers()
    except argparse.ArgumentTypeError as e:
        raise PMAError(f"${WORKERS_ENV}: {e}") from None
    bar = not args.quiet and sys.stderr.isatty()  # a log line per trial where a bar cannot redraw
    log = None if args.quiet or bar else (lambda m: print(m, file=sys.stderr, flush=True))
    result = sweep(args.save_dir, evaluator, windows=args.windows, num_models=args.num_models, methods=methods,
                   unit=args.unit, tokens_per_iter=args.tokens_per_iter, scratch=args.scratch, alpha=args.alpha,
                   workers=workers, progress=bar, log=log)
    args.out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(args.out / "sweep.json", json.dumps(result.to_json(), indent=1).encode(), fsync=False)
    plotted = heatmap(result, args.out / "sweep.png")
    print(table(result))
    print(f"wrote {args.out / 'sweep.json'}" + (f" and {args.out / 'sweep.png'}" if plotted
                                                 else " (no sweep.png: matplotlib is not installed)"))
    if args.keep_best is not None:
        if result.best is None:
            raise PMAError("no merge was evaluated successfully; nothing to keep (see sweep.json)")
        res = publish_best(result, args.keep_best, alpha=args.alpha, workers=workers, force=args.force)
        print(f"kept the best merge ({result.best.method}, iterations {result.best.iterations}) -> {res.output}")
    return 0
