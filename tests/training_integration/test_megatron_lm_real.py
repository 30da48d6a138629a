"""The unpatched launcher's save hook against the REAL Megatron-LM training code of
megatron-core 0.19.2 (``megatron/training/checkpointing.py`` and ``training.py`` from the wheel,
imported on this Python 3.11 with the few test-only shims listed in real_megatron_driver.py).

Each test runs real_megatron_driver.py in a subprocess (the venv's own megatron-core is a
different version), which calls the real ``save_checkpoint`` -- through
``megatron.training.training.save_checkpoint``, the name ``save_checkpoint_and_time`` uses --
with a real MegatronModule, gloo, world size 1, sync and ``--async-save`` (mcore async strategy,
forked writer process, finalize in ``maybe_finalize_async_save``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DRIVER, MCORE_VERSION, subprocess_env


def run_driver(site, *args, env_extra=None, timeout=300):
    env = subprocess_env(site)
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0 and lines, f"driver failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(lines[-1])
    assert out["version"] == MCORE_VERSION
    return out, r


def test_sync_save_fires_after_tracker_on_real_0192(mcore_0192_site, tmp_path):
    save = tmp_path / "save"
    out, _ = run_driver(mcore_0192_site, "sync", save, 10, 20, 30)
    # One call per persistent save, each when the tracker already names it and the
    # checkpoint is complete, and before save_checkpoint returned to the training loop.
    assert [f["iteration"] for f in out["fired"]] == [10, 20, 30]
    for f in out["fired"]:
        assert f["tracker"] == str(f["iteration"]) and f["complete"]
        assert f["save_dir"] == str(save)
    assert out["events"][:3] == [["saved", 10, 1], ["saved", 20, 2], ["saved", 30, 3]]
    # Non-persistent and release saves never trigger a merge.
    assert out["events"][3:] == [["saved-non-persistent", 35, 3], ["saved-release", 37, 3]]
    assert out["restored"]  # uninstall() restores both modules' names


def test_async_save_fires_after_finalize_on_real_0192(mcore_0192_site, tmp_path):
    save = tmp_path / "save"
    out, _ = run_driver(mcore_0192_site, "async", save, 10, 20, 30)
    # Nothing fires when save_checkpoint returns (the save is only scheduled) ...
    assert out["events"] == [["saved", 10, 0], ["saved", 20, 1], ["saved", 30, 2]]
    # ... the tracker is written by the finalize, and the hook runs right after it.
    assert out["trackers"] == [None, "10", "10", "20", "20", "30"]
    assert [f["iteration"] for f in out["fired"]] == [10, 20, 30]
    for f in out["fired"]:
        assert f["tracker"] == str(f["iteration"]) and f["complete"]
    assert out["restored"]


def test_launcher_strips_pma_args_and_runs_script_on_real_0192(mcore_0192_site, tmp_path):
    save, argv_out = tmp_path / "save", tmp_path / "argv.json"
    argv = [DRIVER, "train", save, 10, "--pma-num-models", 3, 20, "--pma-method=ema",
            "--pma-alpha", "0.25", 30, "--async", "--pma-output-root", tmp_path / "merged",
            "--pma-interval-iters", 10, "--pma-optimizer", "average"]
    out, _ = run_driver(mcore_0192_site, "launcher", save, *argv,
                        env_extra={"PMA_TEST_ARGV_OUT": str(argv_out)})
    assert out["rc"] == 0
    # The training script saw its own argv, without a single --pma-* token.
    assert json.loads(argv_out.read_text()) == [str(DRIVER), "train", str(save), "10", "20", "30", "--async"]
    [hook] = out["hooks"]
    assert hook == {"save_dir": str(save), "num_models": 3, "method": "ema", "alpha": 0.25,
                    "weights": None, "interval_iters": 10, "interval_tokens": None,
                    "optimizer": "average", "save_dtype": "input", "output_root": str(tmp_path / "merged"),
                    "calls": [10, 20, 30], "closed": True}
    for f in out["fired"]:
        assert f["tracker"] == str(f["iteration"]) and f["complete"]


@pytest.mark.slow
def test_launcher_with_real_pmahook_merges_real_0192_checkpoints(mcore_0192_site, tmp_path):
    """End to end: launcher + real PMAHook + real 0.19.2 saves -> merged checkpoint on disk."""
    import torch

    import ckpt_factory
    from megatron_pma.schedules import weights

    save = tmp_path / "save"
    out, r = run_driver(mcore_0192_site, "launcher", save, DRIVER, "train", save, 10, 20, 30,
                        "--pma-num-models", 2, "--pma-method", "ema", "--pma-alpha", "0.5",
                        env_extra={"PMA_TEST_ARGV_OUT": str(tmp_path / "argv.json"),
                                   "PMA_TEST_REAL_HOOK": "1"})
    assert out["rc"] == 0
    merged = save / "pma" / "iter_0000030"
    assert (merged / "metadata.json").is_file(), r.stderr[-3000:]
    w = weights("ema", 2, alpha=0.5)
    got = ckpt_factory.load_full_tensors(merged, keys=["tiny.weight"])["tiny.weight"]
    torch.testing.assert_close(got, torch.full((3, 4), w[0] * 20.0 + w[1] * 30.0))
    assert (save / "pma" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
