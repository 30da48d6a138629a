"""SIGKILL a merge at random points (1 process, 2 under torchrun, 2 forked with ``--workers``):
never a visible partial output, the tracker never names an incomplete checkpoint, a rerun succeeds,
and forked workers die with their parent.

Inputs are synthetic torch_dist checkpoints (plain DCP + Megatron's metadata.json/common.pt) of a few
tens of MiB, so that a kill lands mid-write often; the merge code path is the same as for GPT saves.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import ckpt_factory
from helpers import REPO, tree_digest
from megatron_pma.checkpoint import publish
from megatron_pma.names import TRACKER


@pytest.fixture(scope="module")
def synthetic_save(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("synthetic") / "save"
    dirs = []
    for i, it in enumerate((100, 200, 300)):
        g = torch.Generator().manual_seed(i)
        sd = {f"decoder.layers.{k}.weight": torch.randn(4, 256, 1024, generator=g) for k in range(6)}
        sd["rng_state"] = {"seed": i}
        d = root / f"iter_{it:07d}"
        dcp.save(sd, checkpoint_id=str(d), no_dist=True)
        (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
        torch.save({"iteration": it}, d / "common.pt")
        dirs.append(d)
    (root / "latest_checkpointed_iteration.txt").write_text("300")
    return dirs


MODES = ("one process", "torchrun x2", "--workers 2")


def _start(mode, inputs, out):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    merge = ["-m", "megatron_pma", "merge", *map(str, inputs), "--output", str(out), "--quiet"]
    cmd = [sys.executable, *merge]
    if mode == "torchrun x2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *merge]
    elif mode == "--workers 2":
        cmd += ["--workers", "2"]
    else:
        cmd += ["--workers", "1"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_tree(p):
    """SIGKILL the launcher and every descendant (torchrun puts workers in their own sessions)."""
    procs = [psutil.Process(p.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 60  # until each is dead (a zombie at least): the kill has landed
    for proc in procs:
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


def _check_consistent(out_root: Path, expected: dict):
    visible = sorted(p.name for p in out_root.iterdir() if not p.name.startswith("."))
    tracker = out_root / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        assert tracker.read_text() == "300"
        assert "iter_0000300" in visible  # the tracker never names a missing checkpoint
    if "iter_0000300" in visible:  # a visible output is a complete one
        got = ckpt_factory.load_full_tensors(out_root / "iter_0000300")
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_sigkill_at_random_points(synthetic_save, tmp_path):
    before = tree_digest(synthetic_save[0].parent)
    full = {}  # each mode's own duration: a one-process merge never imports torch, torchrun does
    for i, mode in enumerate(MODES):
        reference = tmp_path / f"reference{i}" / "iter_0000300"
        reference.parent.mkdir()
        t0 = time.perf_counter()
        p = _start(mode, synthetic_save, reference)
        assert p.wait(timeout=300) == 0
        full[mode] = time.perf_counter() - t0
    expected = ckpt_factory.load_full_tensors(reference)
    rng = random.Random(0)
    outcomes = {"killed": 0, "finished": 0}
    for trial in range(21):
        mode = MODES[trial % 3]
        out_root = tmp_path / f"t{trial}"
        out_root.mkdir()
        p = _start(mode, synthetic_save, out_root / "iter_0000300")
        time.sleep(rng.uniform(0.05, 1.05) * full[mode])
        if p.poll() is None:
            if mode == "--workers 2":
                workers = psutil.Process(p.pid).children()
                p.kill()  # only the parent: its forked workers must die with it
                _, alive = psutil.wait_procs(workers, timeout=10)
                assert not alive, f"trial {trial}: forked workers outlived their parent"
            else:
                _kill_tree(p)
            outcomes["killed"] += 1
        else:
            outcomes["finished"] += 1
        p.wait()
        _check_consistent(out_root, expected)
        if trial % 5 == 0:  # a rerun after the kill succeeds and cleans the staging folder
            p = _start(mode, synthetic_save, out_root / "iter_0000300")
            if (out_root / "iter_0000300").exists():
                # refuses to overwrite without --force (torchrun reports a failed worker as 1)
                assert p.wait(timeout=300) == (1 if mode == "torchrun x2" else 2)
            else:
                assert p.wait(timeout=300) == 0
            _check_consistent(out_root, expected)
            # no staging debris left; the tracker is missing only when the kill landed between the
            # output's rename and the tracker's (the tracker is written last, by design), after which
            # the rerun rightly refuses to overwrite the published output
            names = sorted(x.name for x in out_root.iterdir())
            assert names in (["iter_0000300"], ["iter_0000300", "latest_checkpointed_iteration.txt"]), names
    leftovers = [c for c in psutil.Process().children(recursive=True) if "megatron_pma" in " ".join(c.cmdline())]
    assert not leftovers
    assert outcomes["killed"] >= 10, outcomes
    assert tree_digest(synthetic_save[0].parent) == before


def test_the_next_merge_removes_a_killed_writers_tracker_temp(synthetic_save, tmp_path):
    """A merge killed while writing the tracker leaves its hidden temp file (named after host and
    pid; the random kills above land there now and then); the next merge into that save dir
    removes it, also when it then refuses (output exists). A temp file of a live process, or of
    another host (a shared file system), is left alone."""
    save = tmp_path / "save"
    save.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a finished, reaped process: its pid is free
    left = publish.atomic_tmp(save / TRACKER, gone.pid)
    live = publish.atomic_tmp(save / TRACKER, os.getpid())
    other_host = save / f".{TRACKER}.tmp-another-host-{gone.pid}"
    for p in (left, live, other_host):
        p.write_bytes(b"30")
    p = _start("one process", synthetic_save, save / "iter_0000300")
    assert p.wait(timeout=300) == 0
    assert not left.exists() and live.exists() and other_host.exists()
    assert (save / TRACKER).read_text() == "300"
    left.write_bytes(b"30")
    p = _start("one process", synthetic_save, save / "iter_0000300")
    assert p.wait(timeout=300) == 2  # exists: refused, but the debris is gone
    assert not left.exists() and live.exists()
