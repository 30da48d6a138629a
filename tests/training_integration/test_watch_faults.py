"""Fault injection around the sidecar watcher, with real processes and real checkpoints:

- SIGKILL the watcher (and its merge child) mid-merge at several points of the merge, restart it:
  no visible partial output, no tracker naming a missing merge, and the window completes.
- SIGKILL the watcher alone (its merge child lives on, orphaned): a restarted watcher waits for
  that merge instead of racing it, and takes the window over if the orphan dies.
- A real training process (examples/tiny_pretrain.py's loop) keeps saving into the save dir
  while the watcher and ``merge --save-dir`` read it: merges equal their reference averages, the
  trainer's checkpoints stay byte-identical to what it wrote, the trainer sees no error, and a
  checkpoint still being written is never picked.

A merge is caught mid-way deterministically by single-stepping its process (SIGCONT, a sleep of
a fraction of a millisecond, SIGSTOP) and looking at its hidden staging folder between steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import ckpt_factory
from conftest import REPO, subprocess_env
from megatron_pma.schedules import weights

ITERS = (10, 20, 30, 40)
TRACKER = "latest_checkpointed_iteration.txt"
DRIVER = Path(__file__).with_name("train_with_digests.py")


@pytest.fixture(scope="module")
def run_dirs():
    return ckpt_factory.cached_run("watch-tp1", iterations=ITERS)  # shared with test_watch.py


@pytest.fixture
def reaper():
    """Whatever a failing test leaves running (watchers, merge children, a trainer) is killed."""
    procs: list = []
    yield procs
    for p in procs:
        p = p.proc if isinstance(p, Watch) else p
        try:
            top = psutil.Process(p.pid)
            targets = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            targets = []
        for q in targets:
            try:
                q.send_signal(signal.SIGKILL)
                q.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        if isinstance(p, subprocess.Popen):
            p.wait()


def _save_dir(run_dirs, dest: Path, tracker: int) -> Path:
    dest.mkdir(parents=True)
    for d in run_dirs:
        shutil.copytree(d, dest / d.name)
    for p in dest.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    (dest / TRACKER).write_text(str(tracker))
    return dest


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _reference(ckpts: list[Path], keys) -> dict:
    """Independent reference: float64 SMA of the full tensors, cast to the input dtype."""
    w = weights("sma", len(ckpts))
    tensors = [ckpt_factory.load_full_tensors(c, keys) for c in ckpts]
    return {k: sum(wi * t[k].double() for wi, t in zip(w, tensors)).to(tensors[-1][k].dtype)
            for k in tensors[-1]}


def _assert_sma_of(out: Path, ckpts: list[Path]):
    """``out`` is a complete checkpoint holding the SMA of ``ckpts`` (every tensor it has)."""
    assert (out / "metadata.json").is_file() and (out / ".metadata").is_file()
    got = ckpt_factory.load_full_tensors(out)
    assert got and not any(k.startswith("optimizer.") for k in got)
    ref = _reference(ckpts, set(got))
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [Path(i["path"]).name for i in prov["inputs"]] == [c.name for c in ckpts]


class Watch:
    """A ``megatron-pma watch`` subprocess (own session); stderr lines collected with arrival times."""

    def __init__(self, save, *extra, reaper=None):
        cmd = [sys.executable, "-m", "megatron_pma", "watch", "--save-dir", str(save), *map(str, extra)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=subprocess_env(), cwd=REPO, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        if reaper is not None:
            reaper.append(self)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def err(self) -> str:
        return "\n".join(l for _, l in self.lines)

    def has(self, text) -> bool:
        return any(text in l for _, l in self.lines)

    def wait_line(self, text, timeout=120):
        _wait(lambda: self.has(text), timeout, f"{text!r} from the watcher", self)

    def merge_child(self, timeout=60) -> psutil.Process:
        def child():
            try:
                kids = psutil.Process(self.proc.pid).children()
            except psutil.NoSuchProcess:
                return None
            return kids[0] if kids else None
        _wait(lambda: child() is not None, timeout, "a merge child", self)
        return child()

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._t.join(10)
        return rc

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self._t.join(10)


def _wait(pred, timeout, what, watch: Watch | None = None):
    t0 = time.monotonic()
    while not pred():
        if watch is not None and watch.proc.poll() is not None:
            watch._t.join(5)
            if pred():
                return
            raise AssertionError(f"watcher exited ({watch.proc.returncode}) waiting for {what}:\n{watch.err}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{watch.err}" if watch else ""))
        time.sleep(0.02)


def _stopped(procs, timeout=5.0):
    """Wait until every process in ``procs`` is really stopped (SIGSTOP is asynchronous)."""
    t0 = time.monotonic()
    for p in procs:
        while True:
            try:
                if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE):
                    break
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() - t0 < timeout, f"{p.pid} did not stop"
            time.sleep(0.0002)


def _step(proc: psutil.Process, seconds: float) -> bool:
    """Let a stopped process run for about ``seconds``; False once it has exited."""
    try:
        proc.send_signal(signal.SIGCONT)
        time.sleep(seconds)
        proc.send_signal(signal.SIGSTOP)
    except psutil.NoSuchProcess:
        return False
    _stopped([proc])
    return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE


# ------------------------------------------------------------------------------------------------
# SIGKILL the watcher mid-merge

STATES = (None, "staging", "data", "metadata", "published")


def _staging_dirs(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.glob(f".{name}.pma-staging-*") if not p.name.endswith(".lock"))


def _merge_state(root: Path, name: str):
    """How far the merge into ``root/name`` got, judged from the outside."""
    if (root / name).exists():
        return "published"
    for d in _staging_dirs(root, name):
        try:
            files = os.listdir(d)
        except FileNotFoundError:
            continue
        if ".metadata" in files:
            return "metadata"  # every data file written, metadata next to them, not yet renamed
        if sum(f.endswith(".distcp") for f in files) >= 3:
            return "data"
        return "staging"
    return None


def _run_merge_to(child: psutil.Process, root: Path, name: str, target: str) -> str:
    """Single-step a (stopped) merge child until its merge reaches ``target``; returns the state."""
    state = _merge_state(root, name)
    while STATES.index(state) < STATES.index(target):
        # coarse steps through the imports and planning, fine ones once the staging folder exists
        if not _step(child, 0.002 if state is None else 0.0003):
            return _merge_state(root, name)
        state = _merge_state(root, name)
    return state


def _exited(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_now(*procs: psutil.Process):
    for p in procs:  # the watcher first: it must not see its child die and clean up after it
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:  # an orphan may stay a zombie a while: its locks are released already
        _wait(lambda: _exited(p), 10, f"pid {p.pid} to die")


@pytest.mark.slow
def test_sigkill_watcher_mid_merge_then_restart(run_dirs, tmp_path, reaper):
    """Kill the watcher and its merge child (the whole tree, as a preempted node would) when the
    merge has just created its staging folder, when it is writing data files, and when its
    metadata is written but not yet renamed; restart after each. Then a restarted watcher completes
    the window: output equal to the reference SMA, tracker last, no staging debris."""
    save = _save_dir(run_dirs, tmp_path / "save", tracker=40)
    inputs_before = _digest(save)
    root = tmp_path / "merged"
    name = "iter_0000040"
    previous_staging = None
    for target in ("staging", "data", "metadata"):
        for attempt in range(3):
            w = Watch(save, "--num-models", 4, "--poll-interval", 0.2, "--output-root", root, reaper=reaper)
            child = w.merge_child()
            reaper.append(child)
            child.send_signal(signal.SIGSTOP)
            _stopped([child])
            state = _run_merge_to(child, root, name, target)
            _kill_now(psutil.Process(w.proc.pid), child)
            w.kill()
            if state != "published":
                break
            # overshot: the merge finished inside one step; start over (rare)
            _assert_sma_of(root / name, run_dirs)
            shutil.rmtree(root / name)
            (root / TRACKER).unlink(missing_ok=True)
        assert state == target, (target, state, w.err)
        # Never a visible partial output, never a tracker, and the merge's debris is hidden.
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [], w.err
        assert "merged iteration" not in w.err and "FAILED" not in w.err, w.err
        [staging] = _staging_dirs(root, name)  # the previous kill's folder was removed on restart
        assert staging != previous_staging
        previous_staging = staging
    # Restart: the window completes and the killed merges' staging folders are gone.
    w = Watch(save, "--num-models", 4, "--poll-interval", 0.2, "--output-root", root, reaper=reaper)
    try:
        w.wait_line("merged iteration 40")
    finally:
        rc = w.stop()
    assert rc == 0, w.err
    assert "FAILED" not in w.err
    _assert_sma_of(root / name, run_dirs)
    assert (root / TRACKER).read_text().strip() == "40"
    assert sorted(p.name for p in root.iterdir()) == sorted([TRACKER, name])  # no staging, no lock
    assert _digest(save) == inputs_before


@pytest.mark.slow
def test_restarted_watcher_waits_for_the_orphaned_merge(run_dirs, tmp_path, reaper):
    """SIGKILL only the watcher: its merge child (own session) lives on. A restarted watcher must
    neither race it (two merges into one output: one of them fails) nor ignore its death."""
    save = _save_dir(run_dirs, tmp_path / "save", tracker=30)
    root = tmp_path / "merged"

    # 1. The orphan dies: the restarted watcher takes the window over.
    a = Watch(save, "--num-models", 3, "--poll-interval", 0.2, "--output-root", root, reaper=reaper)
    orphan = a.merge_child()
    reaper.append(orphan)
    orphan.send_signal(signal.SIGSTOP)
    _stopped([orphan])
    assert _run_merge_to(orphan, root, "iter_0000030", "data") == "data"
    a.kill()  # the watcher alone; the orphan stays (stopped) with its staging lock held
    b = Watch(save, "--num-models", 3, "--poll-interval", 0.2, "--output-root", root, reaper=reaper)
    try:
        b.wait_line("iteration 30: a merge into")
        time.sleep(1.0)  # several polls: still no second merge
        assert psutil.Process(b.proc.pid).children() == []
        assert len(_staging_dirs(root, "iter_0000030")) == 1 and not (root / "iter_0000030").exists()
        _kill_now(orphan)
        b.wait_line("merged iteration 30")
        _assert_sma_of(root / "iter_0000030", run_dirs[:3])
        assert _staging_dirs(root, "iter_0000030") == []

        # 2. The orphan lives: its merge completes, the restarted watcher does not redo it.
        (save / TRACKER).write_text("40")
        orphan = b.merge_child()
        reaper.append(orphan)
        orphan.send_signal(signal.SIGSTOP)
        _stopped([orphan])
        assert _run_merge_to(orphan, root, "iter_0000040", "data") == "data"
    finally:
        b.kill()
    assert "FAILED" not in b.err, b.err
    c = Watch(save, "--num-models", 3, "--poll-interval", 0.2, "--output-root", root, reaper=reaper)
    try:
        c.wait_line("iteration 40: a merge into")
        orphan.send_signal(signal.SIGCONT)
        _wait(lambda: _exited(orphan), 120, "the orphaned merge to finish")
        _wait(lambda: (root / TRACKER).read_text().strip() == "40", 30, "the orphan's tracker")
        time.sleep(1.0)  # several polls after the orphan's publish
    finally:
        rc = c.stop()
    assert rc == 0, c.err
    assert "merged iteration" not in c.err and "FAILED" not in c.err, c.err
    _assert_sma_of(root / "iter_0000040", run_dirs[1:])
    assert sorted(p.name for p in root.iterdir()) == sorted([TRACKER, "iter_0000030", "iter_0000040"])


# ------------------------------------------------------------------------------------------------
# A real training run saving while merges read the save dir

TRAIN_ARGS = ["--micro-batch-size", "8", "--num-val-windows", "64", "--lr", "3e-3", "--lr-warmup-iters", "5",
              "--log-interval", "10", "--threads", "1", "--train-iters", "30", "--save-interval", "5",
              "--no-save-optim"]


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


def _freeze(pgid: int):
    os.killpg(pgid, signal.SIGSTOP)
    _stopped(_group(pgid))


def _merge_save_dir(save: Path, out: Path) -> list[str]:
    """``megatron-pma merge --save-dir`` (N=3); returns the names of the inputs it picked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "megatron_pma", "merge", "--save-dir", str(save),
                        "--num-models", "3", "--output", str(out), "--quiet"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr
    prov = json.loads((out / "pma_provenance.json").read_text())
    return [Path(i["path"]).name for i in prov["inputs"]]


@pytest.mark.slow
def test_training_saves_while_merges_read(tmp_path, reaper):
    save = tmp_path / "save"
    save.mkdir()
    digests = tmp_path / "digests.jsonl"
    w = Watch(save, "--num-models", 3, "--poll-interval", 0.1, "--backfill", reaper=reaper)  # -> SAVE/pma
    log = open(tmp_path / "trainer.log", "w+")
    trainer = subprocess.Popen([sys.executable, str(DRIVER), str(digests), "--save", str(save), *TRAIN_ARGS],
                               stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO,
                               start_new_session=True)
    reaper.append(trainer)
    frozen_merges = {}
    caught_unfinal = None
    try:
        # Freeze the trainer while a save is in flight (folder there, no metadata.json yet).
        inflight = None
        t0 = time.monotonic()
        while inflight is None:
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-5000:]
            assert time.monotonic() - t0 < 180, "no save caught in flight"
            for it in (20, 25, 30):
                ckpt = save / f"iter_{it:07d}"
                if ckpt.is_dir() and not (ckpt / "metadata.json").exists():
                    _freeze(trainer.pid)
                    if (ckpt / "metadata.json").exists():  # finished just before the stop
                        os.killpg(trainer.pid, signal.SIGCONT)
                        break
                    inflight = it
                    break
            else:
                time.sleep(0.001)
        partial = save / f"iter_{inflight:07d}"
        partial_before = _digest(partial)
        tracker = int((save / TRACKER).read_text())
        assert tracker == inflight - 5
        window = [f"iter_{i:07d}" for i in (inflight - 15, inflight - 10, inflight - 5)]
        # merge --save-dir and watch --once pick the final window, never the save in flight.
        frozen_merges["merge"] = tmp_path / "frozen" / "merge"
        assert _merge_save_dir(save, frozen_merges["merge"]) == window
        once = subprocess.run([sys.executable, "-m", "megatron_pma", "watch", "--save-dir", str(save),
                               "--num-models", "3", "--once", "--output-root", str(tmp_path / "once")],
                              capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=240)
        assert once.returncode == 0, once.stderr
        assert f"merged iteration {inflight - 5}:" in once.stderr and f"iteration {inflight}" not in once.stderr
        frozen_merges["once"] = tmp_path / "once" / window[-1]
        assert not (save / "pma" / partial.name).exists()
        assert not list((save / "pma").glob(f".{partial.name}.pma-staging-*"))
        assert _digest(partial) == partial_before  # nobody touched the save in flight
        # Single-step the trainer until metadata.json lands. If the tracker still lags (complete
        # but not final), the checkpoint must still not be picked. The gap is about one step
        # wide: try again at the next saves until a stop lands inside it.
        main = psutil.Process(trainer.pid)
        for it in range(inflight, 31, 5):
            ckpt = save / f"iter_{it:07d}"
            if it > inflight:  # let the trainer run to its next save, then stop it again
                os.killpg(trainer.pid, signal.SIGCONT)
                _wait(lambda: ckpt.is_dir() or trainer.poll() is not None, 120, f"{ckpt.name}")
                _freeze(trainer.pid)
                if (ckpt / "metadata.json").exists():
                    continue
            while not (ckpt / "metadata.json").exists():
                fine = (ckpt / ".metadata").exists()  # metadata.json and the tracker come next
                os.killpg(trainer.pid, signal.SIGCONT)
                if not fine:
                    time.sleep(0.0005)
                os.killpg(trainer.pid, signal.SIGSTOP)
                _stopped([main])
            _stopped(_group(trainer.pid))  # really stopped before the tracker is read
            if int((save / TRACKER).read_text()) < it:
                caught_unfinal = (it, tmp_path / "frozen" / "unfinal")
                picked = _merge_save_dir(save, caught_unfinal[1])
                assert picked == [f"iter_{i:07d}" for i in (it - 15, it - 10, it - 5)]
                break
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGCONT)
    t_thawed = time.monotonic()
    try:
        trainer.wait(timeout=300)
        t_trained = time.monotonic()
        text = (tmp_path / "trainer.log").read_text()
        assert trainer.returncode == 0, text[-5000:]
        assert "Traceback" not in text and "done: iteration 30" in text, text[-5000:]
        w.wait_line("merged iteration 30", timeout=180)
    finally:
        rc = w.stop()
    assert rc == 0, w.err
    assert "FAILED" not in w.err and "cannot read" not in w.err, w.err

    # The trainer saw no error and saved everything; its checkpoints are the bytes it wrote.
    summary = json.loads(Path(str(digests) + ".summary.json").read_text())
    saves = list(range(5, 31, 5))
    assert summary["saved"] == saves
    records = [json.loads(l) for l in digests.read_text().splitlines()]
    assert [r["iteration"] for r in records] == saves
    for r in records:
        assert r["tracker"] == str(r["iteration"])
        assert _digest(save / f"iter_{r['iteration']:07d}") == r["files"], r["iteration"]
    assert (save / TRACKER).read_text().strip() == "30"
    assert sorted(p.name for p in save.iterdir()) == sorted([TRACKER, "pma", *(f"iter_{i:07d}" for i in saves)])

    # Every merge is the SMA of three consecutive final checkpoints, read whole.
    ckpt = {i: save / f"iter_{i:07d}" for i in saves}
    window_of = lambda end: [ckpt[end - 10], ckpt[end - 5], ckpt[end]]  # noqa: E731
    merged = sorted(int(p.name[5:]) for p in (save / "pma").glob("iter_*"))
    assert merged and merged[-1] == 30 and set(merged) <= set(range(15, 31, 5)), merged
    for end in merged:
        _assert_sma_of(save / "pma" / f"iter_{end:07d}", window_of(end))
    for out in frozen_merges.values():
        _assert_sma_of(out, window_of(inflight - 5))
    if caught_unfinal:
        _assert_sma_of(caught_unfinal[1], window_of(caught_unfinal[0] - 5))
    assert sorted(p.name for p in (save / "pma").iterdir()) == sorted(
        [TRACKER, *(f"iter_{i:07d}" for i in merged)])
    # The sidecar really ran beside the training: some merge was reading while the trainer,
    # thawed, was training and saving again.
    spans = [(t - float(re.search(r"\(([\d.]+) s\)$", l).group(1)), t)
             for t, l in w.lines if "] merged iteration" in l]
    assert any(start < t_trained and end > t_thawed for start, end in spans), (spans, t_thawed, t_trained)
    print(f"frozen in flight at {inflight}; complete but not final caught at "
          f"{caught_unfinal[0] if caught_unfinal else None}; watcher merged {merged}")
