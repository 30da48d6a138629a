"""`megatron-pma demo` end to end on a very small setting (real training, real hook, real engine)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "megatron_pma", "demo", "--out", str(out), "--train-iters", "200",
                        "--save-interval", "20", "--num-models", "3", "--curve-points", "3",
                        "--num-val-windows", "64"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["val_loss"]) == {"last", "sma", "ema", "wma", "annealed"}
    assert all(0 < v < 6 for v in res["val_loss"].values())
    assert res["per_seed"][0]["window"] == [160, 180, 200]
    assert res["per_seed"][0]["anneal_branch_iteration"] == 160  # 85% of 200, rounded to a save
    assert (out / "val_loss.png").stat().st_size > 10_000
    assert "held-out loss" in p.stdout
    assert not (out / "seed1").exists()  # checkpoints removed unless --keep
