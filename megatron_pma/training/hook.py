"""PMA during training: merge the latest window of checkpoints every time a save lands.

    from megatron_pma.training import PMAHook

    hook = PMAHook(args.save, num_models=10, method="sma")      # rank 0 only
    ...
    save_checkpoint(...)                 # your save; tracker written, barrier passed
    hook.on_checkpoint_saved(iteration)  # returns at once
    ...
    hook.close()                         # end of training: wait for the last merge

Each request merges the ``num_models`` newest complete checkpoints ``<= iteration`` of
``save_dir`` (consecutive saves, or spaced by ``interval_iters`` / ``interval_tokens``) into
``<output_root>/iter_<iteration>`` (default ``output_root = <save_dir>/pma``). The output is a
normal Megatron checkpoint and ``<output_root>/latest_checkpointed_iteration.txt`` follows the
newest merge, so ``--load <save_dir>/pma`` (or ``--finetune``) picks it up. Any layout
:mod:`megatron_pma.layouts` knows works: a Megatron-Bridge save dir gets Bridge checkpoints and
both of its trackers (``latest_train_state.pt`` too).

How it stays out of the way of training:

- ``on_checkpoint_saved`` only records the request and wakes a worker thread; it never waits.
- The worker runs the merge in a **child process** (``python -m megatron_pma.training.merge_child
  --serve``, the protocol the watcher uses too), so the merge never holds the training process's GIL. The child is started on the
  first merge and kept for the next ones (no interpreter start / torch import per merge; restarted
  if it dies or times out); it lowers its own CPU priority (``nice``, default 10) and uses one
  intra-op thread.
- One merge at a time.

Policy when saves come faster than merges: **coalesce, newest wins**. While a merge runs, at most
one request waits; a newer request replaces the waiting one, which is recorded as ``skipped``. The
merge in flight is never interrupted, and the newest save is always merged eventually (before
``wait()`` / ``close()`` return). A merge needs ``num_models`` checkpoints: earlier requests are
recorded as ``skipped`` too.

Failures never reach training: a merge that raises, exits non-zero or exceeds ``timeout`` is
logged (logger ``megatron_pma.training.hook``) and recorded with ``status="failed"`` and the
error's last line; the engine publishes atomically, so a failed merge leaves no output behind.

``hook.results`` lists one :class:`MergeRecord` per request: ``iteration``, ``output`` (path or
None), ``error`` (None or a one-line string), ``seconds``, ``status`` (``ok``/``failed``/
``skipped``) and ``inputs`` (checkpoint paths merged).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

from megatron_pma.training import merge_child
from megatron_pma.training.merge_child import DEFAULT_MERGE_FN

logger = logging.getLogger("megatron_pma.training.hook")


class MergeRecord(NamedTuple):
    iteration: int
    output: Optional[str]
    error: Optional[str]
    seconds: float
    status: str = "ok"  # ok | failed | skipped
    inputs: tuple = ()


class PMAHook:
    """Merge the newest ``num_models`` checkpoints in the background after every save.

    Args:
        save_dir: the training run's ``--save`` directory (Megatron-LM layout).
        num_models: N, the number of checkpoints in each merge.
        method, alpha, weights: the schedule (``sma`` | ``ema`` | ``wma`` | ``lawa`` | ``custom``),
            passed to :func:`megatron_pma.merge_checkpoints`.
        interval_iters, interval_tokens, tokens_per_iter, every: spacing of the window (default:
            consecutive saves; ``every=s``: every s-th save, LAWA), as in
            :func:`megatron_pma.layouts.select_window`.
        optimizer: ``drop`` | ``average`` | ``keep-last-moments`` (``average`` makes merges that can
            be resumed with their optimizer).
        save_dtype: ``input`` (default) | ``fp32`` | ``bf16`` | ``fp16``: dtype of the merged model
            weights (optimizer state keeps its own).
        allow_extrapolation: accept custom ``weights`` that are negative or do not sum to 1.
        merge_hf_export: Megatron-Bridge runs that save an ``hf/`` export with every checkpoint
            (``checkpoint.also_save_hf_checkpoint``): each merge gets the merged ``hf/`` too.
        output_root: where merges go (default ``<save_dir>/pma``); outputs ``<output_root>/iter_XXXXXXX``.
        keep_last: keep only this many merged checkpoints under ``output_root`` (None: keep all).
        merge_fn: the merge function. A ``"module:function"`` string (default: the real engine) runs
            in a child process; a callable runs in the worker thread (tests, or to run the merge
            in-process on purpose). Called as ``merge_fn(inputs, output, method=..., alpha=...,
            weights=..., optimizer=..., progress=False)``.
        nice: niceness increment of the child process (0 to disable).
        threads: torch intra-op threads of the child's legacy (``--ckpt-format torch``) merges
            (default 1: the training's data loaders need the node's cores); torch_dist merges
            compute with numpy on one thread and never import torch.
        timeout: seconds after which a child merge is killed and recorded as failed (None: no limit).
        python: interpreter for the child (default ``sys.executable``).
    """

    def __init__(
        self,
        save_dir: Union[str, os.PathLike],
        num_models: int,
        *,
        method: str = "sma",
        alpha: float = 0.2,
        weights: Optional[Sequence[float]] = None,
        interval_iters: Optional[int] = None,
        interval_tokens: Optional[int] = None,
        tokens_per_iter: Optional[int] = None,
        every: int = 1,
        optimizer: str = "drop",
        save_dtype: str = "input",
        allow_extrapolation: bool = False,
        merge_hf_export: bool = False,
        output_root: Union[str, os.PathLike, None] = None,
        keep_last: Optional[int] = None,
        merge_fn: Union[str, Callable, None] = None,
        nice: int = 10,
        threads: int = 1,
        timeout: Optional[float] = None,
        python: Optional[str] = None,
    ):
        if num_models < 1:
            raise ValueError("num_models must be >= 1")
        self.save_dir = Path(save_dir)
        self.num_models = int(num_models)
        self.method = method
        self.alpha = alpha
        self.weights = list(weights) if weights is not None else None
        self.interval_iters = interval_iters
        self.interval_tokens = interval_tokens
        self.tokens_per_iter = tokens_per_iter
        self.every = int(every)
        self.optimizer = optimizer
        self.save_dtype = save_dtype
        self.allow_extrapolation = bool(allow_extrapolation)
        self.merge_hf_export = bool(merge_hf_export)
        self.output_root = Path(output_root) if output_root is not None else self.save_dir / "pma"
        self.keep_last = keep_last
        self.merge_fn = merge_fn if merge_fn is not None else DEFAULT_MERGE_FN
        self.nice = nice
        self.threads = int(threads)
        self.timeout = timeout
        self.python = python or sys.executable

        self.results: list[MergeRecord] = []
        self._cond = threading.Condition()
        self._pending: Optional[int] = None
        self._busy = False
        self._closed = False
        self._abort = False
        self._proc: Optional[subprocess.Popen] = None
        self._stderr = None
        self._lines = None
        self._thread = threading.Thread(target=self._loop, name="pma-hook", daemon=True)
        self._thread.start()

    # -- API used by training ------------------------------------------------------------

    def on_checkpoint_saved(self, iteration: int) -> None:
        """Request a merge ending at ``iteration`` (call once the save is final). Never blocks."""
        iteration = int(iteration)
        with self._cond:
            if self._closed:
                logger.warning("PMA: hook is closed; no merge for iteration %d", iteration)
                return
            if self._pending is not None and self._pending != iteration:
                self.results.append(MergeRecord(self._pending, None, "superseded by a newer save", 0.0, "skipped"))
                logger.info("PMA: merge for iteration %d skipped (newer save %d)", self._pending, iteration)
            self._pending = iteration
            self._cond.notify_all()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until no merge is pending or running. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Finish (``wait=True``: the pending and running merges first) and stop the worker."""
        if wait:
            self.wait(timeout)
        with self._cond:
            self._closed = True
            if not wait:
                self._abort = True
                self._pending = None
                if self._proc is not None and self._proc.poll() is None:
                    self._proc.kill()  # a merge in flight is abandoned; its output is never published
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            if not self._busy:
                self._stop_child(kill=not wait)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy or self._pending is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- worker --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                iteration, self._pending = self._pending, None
                self._busy = True
            try:
                rec = self._merge_one(iteration)
            except BaseException as e:  # never let the worker die
                rec = MergeRecord(iteration, None, merge_child.one_line(e), 0.0, "failed")
            with self._cond:
                self.results.append(rec)
                self._busy = False
                self._cond.notify_all()
            if rec.status == "failed":
                logger.warning("PMA: merge for iteration %d failed: %s", iteration, rec.error)
            elif rec.status == "ok":
                logger.info("PMA: merged %d checkpoints -> %s in %.1f s", len(rec.inputs), rec.output, rec.seconds)
                self._prune()

    def _request(self, iteration: int) -> dict:
        return {
            "save_dir": str(self.save_dir),
            "iteration": iteration,
            "num_models": self.num_models,
            "interval_iters": self.interval_iters,
            "interval_tokens": self.interval_tokens,
            "tokens_per_iter": self.tokens_per_iter,
            "every": self.every,
            "output": str(self.output_root / f"iter_{iteration:07d}"),
            "merge_kwargs": {"method": self.method, "alpha": self.alpha, "weights": self.weights,
                             "optimizer": self.optimizer,
                             # the defaults are left out: a custom merge_fn need not know them
                             "save_dtype": self.save_dtype if self.save_dtype != "input" else None,
                             "allow_extrapolation": self.allow_extrapolation or None,
                             "merge_hf_export": self.merge_hf_export or None,
                             # engine functions (given as "module:function") take threads too
                             "threads": self.threads if isinstance(self.merge_fn, str) else None},
            "merge_fn": self.merge_fn if isinstance(self.merge_fn, str) else None,
            "nice": self.nice,
        }

    def _merge_one(self, iteration: int) -> MergeRecord:
        req = self._request(iteration)
        t0 = time.monotonic()
        try:
            if merge_child.too_few(req):  # cheap: no child process for a window that cannot exist yet
                out = merge_child.skipped(req)
                return MergeRecord(iteration, None, out["error"], time.monotonic() - t0, "skipped")
        except Exception as e:
            return MergeRecord(iteration, None, merge_child.one_line(e), time.monotonic() - t0, "failed")
        if callable(self.merge_fn):
            out = merge_child.run_request(req, merge_fn=self.merge_fn)
        else:
            out = self._run_child(req)
        return MergeRecord(iteration, out.get("output"), out.get("error"), time.monotonic() - t0,
                           out.get("status", "failed"), tuple(out.get("inputs", ())))

    def _start_child(self) -> subprocess.Popen:
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        cmd = merge_child.command(self.python, "--serve", "--nice", str(self.nice))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                env=merge_child.child_env(), bufsize=0)
        lines: "queue.Queue[Optional[bytes]]" = queue.Queue()

        def pump():
            for line in iter(proc.stdout.readline, b""):
                lines.put(line)
            lines.put(None)  # EOF: the child is gone

        threading.Thread(target=pump, name="pma-hook-reader", daemon=True).start()
        self._lines = lines
        return proc

    def _stop_child(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if kill:
                proc.kill()
            else:
                proc.stdin.close()  # the child exits at EOF
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            tail = [l for l in self._stderr.read().decode(errors="replace").splitlines() if l.strip()]
            return tail[-1] if tail else "no output"
        except Exception:
            return "no output"

    def _run_child(self, req: dict) -> dict:
        """Send the request to the persistent merge process (started on first use, restarted after
        a crash or a timeout) and wait for its answer."""
        with self._cond:
            if self._abort:
                return {"status": "failed", "error": "hook closed before the merge started"}
            proc = self._proc
        if proc is None or proc.poll() is not None:
            # (re)start outside the lock: on_checkpoint_saved must never wait for a fork/exec
            with self._cond:
                self._stop_child(kill=True)
            new = self._start_child()
            with self._cond:
                self._proc = proc = new
                if self._abort:
                    self._stop_child(kill=True)
                    return {"status": "failed", "error": "hook closed before the merge started"}
        try:
            proc.stdin.write((json.dumps(req) + "\n").encode())
            proc.stdin.flush()
        except OSError:
            pass  # the child died; the reader reports EOF below
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                with self._cond:
                    self._stop_child(kill=True)
                return {"status": "failed", "error": f"merge timed out after {self.timeout} s"}
            if line is None:
                rc = proc.wait()
                err = self._stderr_tail()
                with self._cond:
                    self._stop_child(kill=True)
                return {"status": "failed", "error": f"merge process exited with {rc}: {err}"}
            result = merge_child.parse_result(line.decode(errors="replace"))
            if result is not None:
                return result

    def _prune(self) -> None:
        if not self.keep_last:
            return
        try:
            outs = sorted(p for p in self.output_root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
            for p in outs[: max(0, len(outs) - self.keep_last)]:
                shutil.rmtree(p, ignore_errors=True)
        except OSError as e:
            logger.warning("PMA: pruning old merges failed: %s", e)

