"""`megatron-pma demo` end to end on a very small setting (real training, real hook, real engine), and
its statistics (pure functions)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pma.demo import stats

REPO = Path(__file__).resolve().parents[2]


def _demo(out, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_pma", "demo", "--out", str(out), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


def test_paired_statistics():
    d = stats.paired([1.0, 2.0, 4.0], [0.5, 1.0, 3.0])
    assert d["per_seed"] == [0.5, 1.0, 1.0] and d["mean"] == pytest.approx(2.5 / 3)
    assert d["se"] == pytest.approx(0.16666666667)  # stdev 0.288675 / sqrt(3)
    assert stats.paired([1.0], [2.0])["se"] is None and stats.within_noise(stats.paired([1.0], [2.0])) is None
    assert stats.within_noise({"mean": 0.02, "se": 0.01}) and not stats.within_noise({"mean": 0.03, "se": 0.01})
    assert stats.fmt(d) == "+0.8333 +- 0.1667"
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])
    assert stats.spikes([1.0] * 20 + [2.5, 1.0, 1.9]) == 1
    assert stats.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


@pytest.mark.slow
def test_demo_small_two_seeds_every_claim(tmp_path):
    out = tmp_path / "demo"
    p = _demo(out, "--seeds", "1,2", "--train-iters", "100", "--save-interval", "20", "--num-models", "3",
              "--micro-batch-size", "4", "--curve-points", "3", "--num-val-windows", "32",
              "--lawa-lrs", "3e-3,1e-2", "--init-iters", "20", "--sweep-windows", "40,80",
              "--sweep-num-models", "3", "--sweep-methods", "sma,wsm:linear", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    pma = res["pma"]
    assert set(pma["val_loss"]) == {"last", "sma", "ema", "wma", "wsm:linear", "wsm:cosine", "wsm:inv-sqrt",
                                    "wsm:minus-sqrt", "annealed"}
    assert all(0 < v < 6 for v in pma["val_loss"].values())
    assert pma["window"] == [60, 80, 100] and res["per_seed"][0]["pma"]["anneal_branch_iteration"] == 80
    assert pma["vs_last"]["sma"]["n"] == 2 and pma["vs_last"]["sma"]["se"] is not None
    assert pma["weights"]["wsm:linear"] == pytest.approx([0.25, 0.5, 0.25])
    assert [r["lr"] for r in res["lawa"]["by_lr"]] == [3e-3, 1e-2] and res["lawa"]["by_lr"][1]["gain"]["se"] is not None
    assert len(res["per_seed"][1]["pma_init"]["merged"]["grad_norm"]) == 20
    assert set(res["pma_init"]["metrics"]) >= {"mean_grad_norm", "grad_norm_spikes", "final_val_loss"}
    sweep = res["sweep"]
    assert {(t["window"], t["method"]) for t in sweep["trials"] if t["loss"] is not None} == \
        {(40.0, "sma"), (40.0, "wsm:linear"), (80.0, "sma"), (80.0, "wsm:linear")}
    for png in ("val_loss.png", "pma.png", "lawa.png", "pma_init.png", "sweep.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert "held-out loss" in p.stdout and "LAWA" in p.stdout and "PMA-init" in p.stdout

    # the kept run: a Megatron save dir with the hook's merges; scratch folders gone
    run = out / "run"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    assert (run / "iter_0000100" / "metadata.json").is_file() and (run / "pma" / "iter_0000100").is_dir()
    assert not (out / "work").exists()
    # the three commands it prints run as written
    cmds = [line.strip() for line in p.stdout.splitlines() if line.startswith("  ") and "megatron" in line
            and any(f" {c} " in line for c in ("inspect", "merge", "watch"))]
    assert [c.split()[1] for c in cmds] == ["inspect", "merge", "watch"], p.stdout[-1500:]
    for c in cmds:
        r = subprocess.run(shlex.split(c), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 0, (c, r.stderr[-2000:])
    assert (out / "wsm-merge" / "metadata.json").is_file() and (out / "ema-merges" / "iter_0000100").is_dir()


@pytest.mark.slow
def test_demo_no_keep_leaves_only_results(tmp_path):
    out = tmp_path / "demo"
    p = _demo(out, "--seeds", "3", "--train-iters", "40", "--save-interval", "20", "--num-models", "2",
              "--micro-batch-size", "2", "--num-val-windows", "16", "--curve-points", "2", "--lawa-lrs", "",
              "--init-iters", "0", "--sweep-windows", "", "--no-keep", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["pma.png", "results.json", "val_loss.png"]
    res = json.loads((out / "results.json").read_text())
    assert "lawa" not in res and "pma_init" not in res and res["sweep"] is None
    assert res["pma"]["vs_last"]["annealed"]["se"] is None  # one seed: no noise estimate, not a fake one
    assert "Try:" not in p.stdout
