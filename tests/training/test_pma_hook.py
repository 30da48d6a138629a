"""PMAHook: never blocks, one merge at a time, coalesces (newest wins), survives failures, and runs
the real engine in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path


from megatron_pma.training import PMAHook


def _fake_save_dir(root: Path, iterations) -> Path:
    """A save dir whose checkpoints look complete to discovery (for hooks with a stand-in merge)."""
    for it in iterations:
        d = root / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (root / "latest_checkpointed_iteration.txt").write_text(str(max(iterations)))
    return root


class SlowMerge:
    """Stand-in merge function: records its calls and the concurrency it saw.

    With ``gate`` (a :class:`threading.Event`) each call sets ``started`` and then waits for the
    test to open the gate: the test decides when a merge ends, no sleep has to land in time.
    """

    def __init__(self, fail_on=(), gate: threading.Event | None = None):
        self.fail_on, self.gate = set(fail_on), gate
        self.started = threading.Event()
        self.calls, self.active, self.max_active = [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, inputs, output, **kw):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.started.set()
            if self.gate is not None and not self.gate.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")
            it = int(Path(output).name[5:])
            self.calls.append((it, [Path(p).name for p in inputs], kw))
            if it in self.fail_on:
                raise RuntimeError(f"boom at {it}\nsecond line")
            Path(output).mkdir(parents=True)
            return None
        finally:
            with self.lock:
                self.active -= 1


def test_import_is_lazy():
    code = ("import sys, megatron_pma.training as t; "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, sorted(sys.modules); "
            "assert t.PMAHook.__name__ == 'PMAHook'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_never_blocks_and_coalesces(tmp_path):
    save = _fake_save_dir(tmp_path / "run", [10, 20, 30, 40, 50])
    gate = threading.Event()
    merge = SlowMerge(gate=gate)
    hook = PMAHook(save, 2, method="wma", merge_fn=merge)
    try:
        hook.on_checkpoint_saved(20)
        assert merge.started.wait(timeout=30)  # the merge for 20 is now running, held by the gate
        # These return while that merge cannot finish: had they waited for it, the test would hang
        # here (and the gate's timeout fail the merge) instead of reaching the asserts below.
        for it in (30, 40, 50):
            hook.on_checkpoint_saved(it)
        assert hook.busy and merge.calls == []
        assert [(r.iteration, r.status) for r in hook.results] == [(30, "skipped"), (40, "skipped")]
    finally:
        gate.set()
    assert hook.wait(timeout=30)
    hook.close()
    by_it = {r.iteration: r for r in hook.results}
    assert by_it[20].status == "ok" and by_it[50].status == "ok"
    assert by_it[30].status == "skipped" and by_it[40].status == "skipped"  # superseded while 20 ran
    assert [c[0] for c in merge.calls] == [20, 50]
    assert merge.calls[1][1] == ["iter_0000040", "iter_0000050"]
    assert merge.calls[1][2]["method"] == "wma"
    assert merge.max_active == 1
    assert by_it[50].output == str(save / "pma" / "iter_0000050")
    assert by_it[50].inputs[-1].endswith("iter_0000050")


def test_too_few_checkpoints_are_skipped(tmp_path):
    save = _fake_save_dir(tmp_path / "run", [10, 20])
    merge = SlowMerge()
    with PMAHook(save, 3, merge_fn=merge, output_root=tmp_path / "out") as hook:
        hook.on_checkpoint_saved(20)
    assert [r.status for r in hook.results] == ["skipped"] and merge.calls == []


def test_failures_are_recorded_not_raised(tmp_path, caplog):
    save = _fake_save_dir(tmp_path / "run", [10, 20, 30])
    merge = SlowMerge(fail_on={20})
    hook = PMAHook(save, 2, merge_fn=merge)
    hook.on_checkpoint_saved(20)
    hook.wait()
    hook.on_checkpoint_saved(30)  # the worker survived the failure
    hook.close()
    r20, r30 = hook.results
    assert r20.status == "failed" and "RuntimeError: second line" == r20.error and r20.output is None
    assert r30.status == "ok"
    assert any("failed" in m for m in caplog.messages)


def test_child_process_crash_is_recorded_and_restarted(tmp_path):
    """The merge process dies (here: an "interpreter" that exits at once): recorded as failed, and
    the next request starts a fresh process."""
    save = _fake_save_dir(tmp_path / "run", [10, 20, 30])
    hook = PMAHook(save, 2, python="false")
    hook.on_checkpoint_saved(20)
    hook.wait()
    hook.on_checkpoint_saved(30)
    hook.close()
    assert [r.status for r in hook.results] == ["failed", "failed"]
    assert "merge process exited with 1" in hook.results[0].error
    assert not (save / "pma" / "iter_0000020").exists()


def test_child_reports_engine_errors(tmp_path):
    """What the child does with a request whose merge function cannot be imported: a one-line error."""
    from megatron_pma.training import merge_child

    save = _fake_save_dir(tmp_path / "run", [10, 20])
    hook = PMAHook(save, 2, merge_fn="no_such_module_xyz:merge")
    req = hook._request(20)
    hook.close()
    res = merge_child.run_request(req)
    assert res["status"] == "failed" and "no_such_module_xyz" in res["error"] and "\n" not in res["error"]


def test_real_engine_in_child_process(tiny_pretrain_run, tmp_path):
    """Default merge_fn: the real engine in a child process, on the real checkpoints of tiny_pretrain_run."""
    out_root = tmp_path / "merges"
    hook = PMAHook(tiny_pretrain_run, 3, method="ema", alpha=0.5, output_root=out_root, keep_last=1)
    hook.on_checkpoint_saved(20)  # only 2 checkpoints up to 20 -> skipped
    hook.wait()
    hook.on_checkpoint_saved(30)
    hook.close()
    assert [r.status for r in hook.results] == ["skipped", "ok"], hook.results
    r = hook.results[-1]
    assert [Path(p).name for p in r.inputs] == ["iter_0000010", "iter_0000020", "iter_0000030"]
    assert (out_root / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    prov = json.loads(next((out_root / "iter_0000030").glob("*provenance*.json")).read_text())
    assert "ema" in json.dumps(prov)
    # optimizer="drop" (default): model only
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(out_root / "iter_0000030")).read_metadata().state_dict_metadata
    assert not any(k.startswith("optimizer.") for k in keys) and "decoder.final_layernorm.weight" in keys
