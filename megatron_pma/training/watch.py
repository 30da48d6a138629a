"""`megatron-pma watch`: a sidecar that merges the latest window whenever a checkpoint lands.

    megatron-pma watch --save-dir SAVE --num-models N [--method ema --alpha 0.2]
                       [--interval-iters K | --interval-tokens T] [--output-root DIR]
                       [--poll-interval S] [--once] [--backfill]

Runs beside a training job (another process, another node, a cron job with ``--once``) and
needs nothing from it but the save dir. Every ``--poll-interval`` seconds it looks at SAVE:

- A checkpoint counts once it is *final*: its ``metadata.json`` exists and the tracker
  (``latest_checkpointed_iteration.txt``) has reached its iteration. A save in flight, or one
  newer than the tracker, is left for a later poll. Without a tracker nothing is final
  (``--ignore-tracker`` takes every checkpoint with a metadata.json, for copied save dirs).
- The newest final checkpoint ends the window: the ``--num-models`` newest final checkpoints up
  to it (spaced by the interval, if given) are merged into ``<output-root>/iter_XXXXXXX``
  (default output root ``SAVE/pma``; its tracker follows the newest merge). Saves that land
  while a merge runs are coalesced: the next poll merges the newest window only
  (``--backfill`` merges every window that has no output yet, oldest first).
- Idempotent: a window whose output already exists is never merged again, so a restarted
  watcher picks up where it left off; one whose merge is still running (the orphaned merge
  child of a killed watcher holds its staging lock) is left to it, and merged anew only if
  that merge dies (its staging folder is then removed). A merge that fails is logged and not
  retried by this process.
- One line per merge on stderr.

Megatron-Bridge: SAVE may be Bridge's ``checkpoint.save`` dir; its tracker is
``latest_train_state.pt`` and/or ``latest_checkpointed_iteration.txt`` (when both exist they
must agree); outputs get both, and never the newest input's ``hf/`` export.

A tracker that names an iteration without an ``iter_*`` folder (a save without weights, e.g.
Megatron-LM's ``--freeze-all-layers``) is skipped with one line: nothing is merged for it.

NeMo 2: SAVE may be NeMo's ``<log_dir>/checkpoints`` dir (no tracker there). A checkpoint is
final once its ``weights/metadata.json`` exists and NeMo's ``<ckpt>-unfinished`` marker is gone;
its iteration is the ``step=N`` of its name; a ``-last`` copy of a step already present is
ignored and ``-EMA`` copies are skipped. Each output is itself a NeMo 2 checkpoint
(``weights/`` + the newest input's ``context/``) at ``SAVE/pma/iter_XXXXXXX``. That folder is
invisible to NeMo's resume logic: ``AutoResume`` only considers ``checkpoints/*last`` and
``*end`` dirs, ``ModelCheckpoint``'s top-k bookkeeping only dirs whose path names the monitored
metric, and its startup cleanup only dirs with an ``-unfinished`` marker. Keep NeMo's
``save_top_k=-1`` (or large): top-k rotation by val_loss deletes checkpoints the window needs.

Each merge runs in a child process (its own session, niced; :mod:`megatron_pma.training.merge_child`,
the protocol PMAHook uses too). On SIGTERM or SIGINT the watcher
stops polling; a merge in flight is terminated, its staging folder removed (the engine
publishes by rename, so a killed merge never leaves a visible output), and the watcher exits
with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_pma.training import merge_child

PREFIX = "megatron-pma watch"


def log(msg: str) -> None:
    print(f"[{PREFIX}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_pma.cli_common import add_schedule_arguments

    parser.add_argument("--save-dir", required=True, help="the training run's --save directory (or NeMo 2 <log_dir>/checkpoints)")
    parser.add_argument("--output-root", default=None,
                        help="where merges go, one iter_XXXXXXX each (default SAVE_DIR/pma)")
    parser.add_argument("--poll-interval", type=float, default=30.0,
                        help="seconds between looks at the save dir (default 30)")
    parser.add_argument("--once", action="store_true",
                        help="look once, merge if there is something new, and exit")
    parser.add_argument("--backfill", action="store_true",
                        help="merge every window without an output (default: only the newest)")
    parser.add_argument("--ignore-tracker", action="store_true",
                        help="treat every checkpoint with a metadata.json as final (for save dirs without a tracker)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the merge process (default 10)")
    add_schedule_arguments(parser)


# --------------------------------------------------------------------------------------------
# What to merge
# --------------------------------------------------------------------------------------------


def output_for(output_root: Path, iteration: int, layout=None) -> Path:
    """``layout``: the save dir's, which names its merges (default iter_XXXXXXX)."""
    return Path(output_root) / (layout.output_name(iteration) if layout else f"iter_{iteration:07d}")


def merged(output_root: Path, iteration: int, layout=None) -> bool:
    """The output of the window ending at ``iteration`` exists (published => complete)."""
    from megatron_pma import layouts

    out = output_for(output_root, iteration, layout)
    # legacy outputs too; a NeMo 2 output holds its tensors in weights/, a NeMo-RL one in policy/
    return out.is_dir() and layouts.of_checkpoint(out).is_complete(out)


def final_checkpoints(save_dir: Path, ignore_tracker: bool) -> list[tuple[int, Path]]:
    """Final checkpoints of the save dir, oldest first (see the module docstring)."""
    from megatron_pma import layouts

    if not save_dir.is_dir():
        return []
    layout = layouts.of_save_dir(save_dir)
    if ignore_tracker or not layout.keeps_tracker:  # NeMo: no tracker; -unfinished markers say it
        return layouts.list_checkpoints(save_dir, up_to_tracker=False)
    tracker = layout.read_tracker(save_dir)
    if tracker is None:
        return []
    # list_checkpoints drops those newer than an integer tracker; "release" is not an iteration.
    return layouts.list_checkpoints(save_dir, up_to_tracker=True)


def plan_window(save_dir: Path, end: int, wkw: dict, ignore_tracker: bool) -> list[Path]:
    """The window ending at checkpoint ``end`` (raises PMAError when it cannot be formed)."""
    from megatron_pma.errors import PMAError
    from megatron_pma.layouts import select_window

    window = select_window(save_dir, up_to_iteration=end, **wkw)
    if not window or _iteration_of(Path(window[-1])) != end:
        raise PMAError(f"no window of {wkw.get('num_models')} checkpoints ends at iteration {end}")
    return [Path(p) for p in window]


def _iteration_of(ckpt: Path) -> int | None:
    from megatron_pma import layouts
    from megatron_pma.checkpoint.common_state import read_common_state

    layout = layouts.of_checkpoint(ckpt)
    return layout.iteration(ckpt, lambda: read_common_state(Path(ckpt) / layout.data_subdir))


class Watcher:
    def __init__(self, save_dir, output_root=None, *, window_kwargs: dict, schedule_kwargs: dict,
                 poll_interval: float = 30.0, backfill: bool = False, ignore_tracker: bool = False,
                 nice: int = 10, python: str = sys.executable):
        self.save_dir = Path(save_dir)
        self.output_root = Path(output_root) if output_root else self.save_dir / "pma"
        self.wkw = dict(window_kwargs)
        self.skw = dict(schedule_kwargs)
        self.poll_interval = poll_interval
        self.backfill = backfill
        self.ignore_tracker = ignore_tracker
        self.nice = nice
        self.python = python
        self.stop = threading.Event()
        self.failed: dict[int, str] = {}  # end iteration -> error (not retried)
        self.merges: list[dict] = []
        self._said: set = set()  # one-time log lines already printed

    # -- logging once ------------------------------------------------------------------------
    def _once(self, key, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log(msg)

    # -- one poll ----------------------------------------------------------------------------
    def pending(self) -> list[int]:
        """End iterations to merge now, oldest first."""
        ckpts = final_checkpoints(self.save_dir, self.ignore_tracker)
        if not self.save_dir.is_dir():
            self._once("nodir", f"waiting for {self.save_dir} to appear")
            return []
        if not ckpts:
            self._once(("none",), f"waiting for a final checkpoint in {self.save_dir}")
            return []
        ends = [it for it, _ in ckpts]
        if merged(self.output_root, ends[-1], self.layout()):
            # A merge killed between its publish and its tracker write left the tracker behind.
            _advance_tracker(self.output_root, ends[-1], self.layout())
        if not self.backfill:
            ends = ends[-1:]
        return [it for it in ends if not merged(self.output_root, it, self.layout()) and it not in self.failed]

    def layout(self):
        """The save dir's layout (it names the outputs); asked once the save dir has checkpoints."""
        from megatron_pma import layouts

        return layouts.of_save_dir(self.save_dir)

    def poll(self) -> int:
        """Merge what is pending; returns the number of failed merges."""
        from megatron_pma.checkpoint import publish
        from megatron_pma.checkpoint.safe_pickle import UnsafePickle
        from megatron_pma.errors import PMAError

        failures = 0
        try:
            ends = self.pending()
        except UnsafePickle:  # a checkpoint that could run code: stop, never wait for it
            raise
        except (PMAError, PermissionError) as e:  # e.g. a garbled tracker: wait for the next save
            self._once(("bad", str(e)), f"cannot read {self.save_dir} yet: {e}")
            return 0
        for end in ends:
            if self.stop.is_set():
                break
            if publish.in_flight(output_for(self.output_root, end, self.layout())):
                # Another live merge builds this output (e.g. the child of a watcher that was
                # killed, still running): let it finish; if it dies, a later poll merges.
                self._once(("busy", end), f"iteration {end}: a merge into "
                            f"{output_for(self.output_root, end, self.layout())} is already running; waiting for it")
                continue
            try:
                window = plan_window(self.save_dir, end, self.wkw, self.ignore_tracker)
            except UnsafePickle:
                raise
            except PMAError as e:
                # Usually: fewer than N checkpoints so far. Say it once per end iteration.
                self._once(("win", end), f"iteration {end}: no merge: {e}")
                continue
            failures += 0 if self.merge(end, window) else 1
        return failures

    # -- one merge ---------------------------------------------------------------------------
    def merge(self, end: int, window: list[Path]) -> bool:
        out = output_for(self.output_root, end, self.layout())
        self.output_root.mkdir(parents=True, exist_ok=True)
        # threads=1: a legacy merge must not take every core of a node that trains
        req = {"inputs": [str(p) for p in window], "output": str(out), "nice": self.nice,
               "merge_kwargs": dict(self.skw, threads=1)}
        t0 = time.monotonic()
        proc = subprocess.Popen(
            merge_child.command(self.python, json.dumps(req)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env=merge_child.child_env(), start_new_session=True)  # Ctrl-C reaches only us; we stop the child
        # Read both pipes in threads so a chatty child never blocks on a full pipe.
        outs: dict[str, str] = {}
        readers = [threading.Thread(target=lambda n=n, f=f: outs.__setitem__(n, f.read()), daemon=True)
                   for n, f in (("out", proc.stdout), ("err", proc.stderr))]
        for r in readers:
            r.start()
        while proc.poll() is None:
            if self.stop.wait(0.1):
                self._abort(proc, out, end)
                return True  # not a failure: we were asked to stop
        for r in readers:
            r.join()
        seconds = time.monotonic() - t0
        result = None
        for line in outs.get("out", "").splitlines():
            result = merge_child.parse_result(line) or result
        if proc.returncode == 0 and result and result["status"] == "ok":
            its = ",".join(str(i) for i in result["iterations"])
            ws = ",".join(f"{w:.4g}" for w in result["weights"])
            log(f"merged iteration {end}: {self.skw.get('method', 'sma')} of [{its}] "
                f"weights [{ws}] -> {result['output']} ({seconds:.1f} s)")
            self.merges.append(dict(result, end=end))
            return True
        if result and result.get("error"):
            err = result["error"]
        else:
            tail = [l for l in outs.get("err", "").strip().splitlines() if l.strip()]
            err = tail[-1] if tail else f"merge process exited with status {proc.returncode}"
        self.failed[end] = err
        _cleanup_staging(out, proc.pid)
        log(f"merge for iteration {end} FAILED (not retried): {err}")
        from megatron_pma.checkpoint.safe_pickle import REFUSAL
        from megatron_pma.errors import PMAError

        if REFUSAL in err:  # the child refused a pickle: stop, exit 2
            raise PMAError(err)
        return False

    def _abort(self, proc: subprocess.Popen, out: Path, end: int) -> None:
        """Stop the merge in flight and remove what it staged."""
        log(f"stopping: terminating the merge for {out.name}")
        for sig in (signal.SIGTERM, signal.SIGCONT):  # CONT: a stopped child must see TERM
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        _cleanup_staging(out, proc.pid)
        if merged(out.parent, end, self.layout()):
            # Killed after its atomic rename: the output is whole; finish the tracker update.
            _advance_tracker(out.parent, end, self.layout())

    # -- the loop ----------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        log(f"watching {self.save_dir} -> {self.output_root} (N={self.wkw.get('num_models')}, "
            f"{self.skw.get('method', 'sma')}, every {self.poll_interval:g} s)"
            if not once else f"checking {self.save_dir} once -> {self.output_root}")
        failures = 0
        while not self.stop.is_set():
            failures += self.poll()
            if once:
                break
            self.stop.wait(self.poll_interval)
        if self.stop.is_set():
            log("stopped")
            return 0
        return 1 if failures else 0


def _advance_tracker(root: Path, iteration: int, save_layout=None) -> None:
    """Point the outputs' save dir at a published merge (all the trackers of its layout)."""
    from megatron_pma import layouts

    out = output_for(root, iteration, save_layout)
    layout = layouts.of_checkpoint(out)
    try:
        cur = layout.read_tracker(root)
    except Exception:  # e.g. trackers left disagreeing by a merge killed between them: rewrite both
        cur = None
    if not isinstance(cur, int) or cur < iteration:
        layout.write_trackers(root, iteration, out)


def _cleanup_staging(out: Path, child_pid: int) -> None:
    """Remove what a merge into ``out`` left behind when it was killed: the engine's hidden
    staging / retired folders beside ``out`` (only those whose owner is dead) and a
    half-written tracker temp file."""
    from megatron_pma.checkpoint.publish import atomic_tmp, remove_stale
    from megatron_pma.names import TRACKER, TRAIN_STATE_TRACKER

    remove_stale(out)
    for name in (TRACKER, TRAIN_STATE_TRACKER):  # also if the child's pid was reused since
        try:
            atomic_tmp(out.parent / name, child_pid).unlink(missing_ok=True)
        except OSError:
            pass


def run(args: argparse.Namespace) -> int:
    from megatron_pma.cli_common import schedule_kwargs, window_kwargs
    from megatron_pma.errors import PMAError

    if args.poll_interval <= 0:
        raise PMAError("--poll-interval must be > 0")
    wkw = window_kwargs(args)
    if wkw["num_models"] < 1:
        raise PMAError("--num-models must be >= 1")
    save_dir = Path(args.save_dir)
    if args.once and not save_dir.is_dir():
        raise PMAError(f"{save_dir}: no such save directory")
    w = Watcher(save_dir, args.output_root, window_kwargs=wkw, schedule_kwargs=schedule_kwargs(args),
                poll_interval=args.poll_interval, backfill=args.backfill,
                ignore_tracker=args.ignore_tracker, nice=args.nice)

    stopped_by = set()

    def on_signal(signum, _frame):
        stopped_by.add(signum)
        w.stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return w.run(once=args.once)
    finally:
        for s, h in old.items():
            # A signal that stopped us stays ignored while we exit: Slurm can deliver SIGTERM twice, and
            # the default action on a late repeat turned a clean stop (exit 0) into exit 143.
            signal.signal(s, signal.SIG_IGN if s in stopped_by else h)


if __name__ == "__main__":
    from megatron_pma.cli import main

    sys.exit(main(["watch"] + sys.argv[1:]))
