"""`megatron-pma watch` against real megatron-core checkpoints (tests/ckpt_factory.py), as a
real subprocess: --once, live polling with checkpoints landing in stages, idempotent restart,
and SIGTERM / SIGINT while idle and while a merge is in flight."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ckpt_factory
from conftest import REPO, subprocess_env
from megatron_pma.schedules import weights

ITERS = (10, 20, 30, 40)
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def run_dirs():
    return ckpt_factory.cached_run("watch-tp1", iterations=ITERS)


def stage_save_dir(run_dirs, dest: Path, upto: int, tracker: int | None) -> Path:
    """A save dir holding the cached run's checkpoints up to ``upto`` (copied), tracker set."""
    dest.mkdir(parents=True)
    for d in run_dirs:
        if int(d.name[5:]) <= upto:
            shutil.copytree(d, dest / d.name)
    if tracker is not None:
        (dest / TRACKER).write_text(str(tracker))
    return dest


def watch_cmd(save, *extra):
    return [sys.executable, "-m", "megatron_pma", "watch", "--save-dir", str(save), *map(str, extra)]


def run_watch(save, *extra, timeout=240):
    return subprocess.run(watch_cmd(save, *extra), capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=REPO)


def merged_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "] merged iteration" in l]


def expected(run_dirs, its, method, alpha=0.2):
    w = weights(method, len(its), alpha=alpha)
    tensors = [ckpt_factory.load_full_tensors(d) for d in run_dirs if int(d.name[5:]) in its]
    return {k: sum(wi * t[k].double() for wi, t in zip(w, tensors)).to(tensors[0][k].dtype)
            for k in tensors[0]}


def assert_merge_of(out: Path, run_dirs, its, method, alpha=0.2):
    assert (out / "metadata.json").is_file()
    got = ckpt_factory.load_full_tensors(out)
    exp = expected(run_dirs, its, method, alpha)
    model_keys = [k for k in exp if not k.startswith("optimizer")]
    assert model_keys
    for k in model_keys:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-6)


def test_once_merges_newest_final_window_and_is_idempotent(run_dirs, tmp_path):
    # iter_0000040 exists and is complete, but the tracker says 30: its save is not final.
    save = stage_save_dir(run_dirs, tmp_path / "save", upto=40, tracker=30)
    r = run_watch(save, "--num-models", 3, "--method", "ema", "--alpha", 0.3, "--once")
    assert r.returncode == 0, r.stderr
    [line] = merged_lines(r.stderr)
    assert "merged iteration 30: ema of [10,20,30]" in line
    root = save / "pma"
    assert sorted(p.name for p in root.iterdir()) == sorted([TRACKER, "iter_0000030"])  # nothing hidden
    assert (root / TRACKER).read_text().strip() == "30"
    assert_merge_of(root / "iter_0000030", run_dirs, (10, 20, 30), "ema", 0.3)
    # Restart: the merge whose output exists is not redone (output untouched).
    stamp = (root / "iter_0000030" / "metadata.json").stat().st_mtime_ns
    r = run_watch(save, "--num-models", 3, "--method", "ema", "--alpha", 0.3, "--once")
    assert r.returncode == 0 and merged_lines(r.stderr) == [], r.stderr
    assert (root / "iter_0000030" / "metadata.json").stat().st_mtime_ns == stamp
    # The tracker moves to 40: --backfill merges every window without an output (here only 40;
    # 10 and 20 cannot end a window of 3, 30 exists).
    (save / TRACKER).write_text("40")
    r = run_watch(save, "--num-models", 3, "--method", "ema", "--alpha", 0.3, "--once", "--backfill")
    assert r.returncode == 0, r.stderr
    [line] = merged_lines(r.stderr)
    assert "merged iteration 40: ema of [20,30,40]" in line
    assert (root / TRACKER).read_text().strip() == "40"
    assert (root / "iter_0000030" / "metadata.json").stat().st_mtime_ns == stamp
    (save / TRACKER).write_text("30")
    # Inputs never modified.
    assert sorted(p.name for p in save.iterdir()) == sorted([
        TRACKER, "iter_0000010", "iter_0000020", "iter_0000030", "iter_0000040", "pma"])


def test_once_errors_and_too_few(run_dirs, tmp_path):
    r = run_watch(tmp_path / "nope", "--num-models", 2, "--once")
    assert r.returncode == 2 and "no such save directory" in r.stderr.strip().splitlines()[-1]
    save = stage_save_dir(run_dirs, tmp_path / "save", upto=10, tracker=10)
    r = run_watch(save, "--num-models", 2, "--once", "--output-root", tmp_path / "out")
    assert r.returncode == 0 and merged_lines(r.stderr) == []
    assert "iteration 10" in r.stderr and not (tmp_path / "out" / "iter_0000010").exists()


def _wait_for(pred, timeout, proc=None, what=""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"watcher exited early ({proc.returncode}) waiting for {what}: "
                                 f"{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Watch:
    """A watcher subprocess whose stderr lines are collected in the background."""

    def __init__(self, save, *extra):
        self.proc = subprocess.Popen(watch_cmd(save, *extra), stderr=subprocess.PIPE, text=True,
                                     env=subprocess_env(), cwd=REPO)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, text, timeout=120):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(text in l for l in self.lines):
                return
            if self.proc.poll() is not None:
                self._t.join(5)
                if any(text in l for l in self.lines):
                    return
                raise AssertionError(f"watcher exited ({self.proc.returncode}) before {text!r}:\n"
                                     + "\n".join(self.lines))
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {text!r}:\n" + "\n".join(self.lines))

    def stop(self, sig, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._t.join(10)
        return rc

    @property
    def err(self):
        return "\n".join(self.lines)


@pytest.mark.slow
def test_live_watch_follows_saves_and_stops_on_sigint(run_dirs, tmp_path):
    save = stage_save_dir(run_dirs, tmp_path / "save", upto=20, tracker=20)
    out = tmp_path / "merged"
    w = Watch(save, "--num-models", 2, "--poll-interval", 0.2, "--output-root", out)
    try:
        w.wait_line("merged iteration 20")
        # A save in flight: files without metadata.json -> ignored.
        src30 = run_dirs[2]
        partial = save / "iter_0000030"
        partial.mkdir()
        for f in src30.iterdir():
            if f.name != "metadata.json":
                shutil.copy2(f, partial / f.name)
        time.sleep(1.0)
        # Complete but newer than the tracker -> still ignored.
        shutil.copy2(src30 / "metadata.json", partial / "metadata.json")
        time.sleep(1.0)
        assert not (out / "iter_0000030").exists() and not list(out.glob(".iter_0000030.pma-staging*"))
        # Tracker reaches 30 -> merged.
        (save / TRACKER).write_text("30")
        w.wait_line("merged iteration 30")
    finally:
        rc = w.stop(signal.SIGINT)
    assert rc == 0, w.err
    lines = merged_lines(w.err)
    assert len(lines) == 2 and "of [10,20]" in lines[0] and "of [20,30]" in lines[1], w.err
    assert_merge_of(out / "iter_0000030", run_dirs, (20, 30), "sma")
    assert sorted(p.name for p in out.iterdir()) == sorted([TRACKER, "iter_0000020", "iter_0000030"])
    assert (out / TRACKER).read_text().strip() == "30"


def test_sigterm_while_idle_exits_zero(tmp_path):
    save = tmp_path / "empty"
    save.mkdir()
    w = Watch(save, "--num-models", 2, "--poll-interval", 0.2)
    try:
        w.wait_line("waiting for a final checkpoint", timeout=60)
    finally:
        rc = w.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, w.err
    assert w.lines[-1].endswith("stopped")
    assert not (save / "pma").exists()


def test_a_repeated_sigterm_while_stopping_still_exits_zero(tmp_path):
    """Slurm can deliver a step's SIGTERM twice; a repeat that lands after the watcher said
    "stopped" (its handler already gone) killed it: exit 143 instead of 0. Never fails by chance: a
    repeat that lands earlier, or after the exit, is harmless either way."""
    save = tmp_path / "empty"
    save.mkdir()
    w = Watch(save, "--num-models", 2, "--poll-interval", 0.2)
    try:
        w.wait_line("waiting for a final checkpoint", timeout=60)
        w.proc.send_signal(signal.SIGTERM)
        w.wait_line("stopped", timeout=60)
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    finally:
        rc = w.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, w.err


def test_the_signal_that_stopped_the_watcher_stays_ignored(tmp_path, monkeypatch):
    """The deterministic half of the test above: once a SIGTERM has stopped the watcher, SIGTERM is
    ignored (not the default action) until the process exits; SIGINT, which did not, is restored."""
    import argparse

    from megatron_pma.training import watch

    real_run = watch.Watcher.run

    def run_after_sigterm(self, once=False):
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread before the next line
        return real_run(self, once)

    monkeypatch.setattr(watch.Watcher, "run", run_after_sigterm)
    parser = argparse.ArgumentParser()
    watch.add_arguments(parser)
    (tmp_path / "save").mkdir()
    args = parser.parse_args(["--save-dir", str(tmp_path / "save"), "--num-models", "2", "--poll-interval", "0.2"])
    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert watch.run(args) == 0
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == old_int
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_sigterm_during_merge_leaves_no_output(run_dirs, tmp_path):
    """SIGTERM while the merge child is inside its staging dir: exit 0, no output, no staging.

    The child is single-stepped (SIGCONT, ~2 ms, SIGSTOP) until its hidden staging folder
    exists, so the signal deterministically lands mid-merge; the watcher must also resume
    the stopped child for it to see the SIGTERM."""
    save = stage_save_dir(run_dirs, tmp_path / "save", upto=40, tracker=40)
    out = tmp_path / "merged"
    def staged():
        return out.exists() and any(p.is_dir() for p in out.glob(".iter_0000040.pma-staging-*"))
    w = Watch(save, "--num-models", 4, "--poll-interval", 0.2, "--output-root", out)
    child = None
    t_stop = None
    try:
        t0 = time.monotonic()
        while not _children(w.proc.pid):
            assert w.proc.poll() is None, w.err
            assert time.monotonic() - t0 < 60, "no merge child"
            time.sleep(0.01)
        child = _children(w.proc.pid)[0]
        os.kill(child, signal.SIGSTOP)
        t0 = time.monotonic()
        while not staged():
            assert not (out / "iter_0000040").exists(), "merge finished before it could be caught"
            assert time.monotonic() - t0 < 120, "staging dir never appeared"
            os.kill(child, signal.SIGCONT)
            time.sleep(0.002)
            os.kill(child, signal.SIGSTOP)
    finally:
        t_stop = time.monotonic()
        rc = w.stop(signal.SIGTERM)
    assert rc == 0, w.err
    assert time.monotonic() - t_stop < 8, "watcher waited for the kill timeout: child not resumed"
    assert "terminating the merge for iter_0000040" in w.err and merged_lines(w.err) == []
    assert not (out / "iter_0000040").exists()
    assert sorted(p.name for p in out.iterdir()) == []  # no staging, no tracker, no temp file
    assert not Path(f"/proc/{child}").exists()  # reaped


def test_once_finishes_a_tracker_left_behind_by_a_killed_merge(run_dirs, tmp_path):
    """A merge killed after its atomic rename but before its tracker write: the next pass writes it."""
    save = stage_save_dir(run_dirs, tmp_path / "save", upto=30, tracker=30)
    root = save / "pma"
    root.mkdir()
    r = subprocess.run([sys.executable, "-m", "megatron_pma", "merge", "--save-dir", str(save), "--num-models", "3",
                        "--output", str(root / "iter_0000030"), "--no-tracker", "--quiet"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr
    assert not (root / TRACKER).exists()
    r = run_watch(save, "--num-models", 3, "--once")
    assert r.returncode == 0, r.stderr
    assert not merged_lines(r.stderr)  # nothing merged again
    assert (root / TRACKER).read_text().strip() == "30"
