"""Helpers for the training tests: run examples/tiny_pretrain.py for real (gloo), read its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny_pretrain.py"
# small and fast: 2 layers, hidden 64, context 64, vocab 256 (the defaults), small batches
FAST = ["--micro-batch-size", "8", "--num-val-windows", "64", "--lr", "3e-3", "--lr-warmup-iters", "5",
        "--log-interval", "10", "--threads", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_pretrain(args, nproc: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run examples/tiny_pretrain.py (one process, or torchrun with ``nproc`` ranks)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(EXAMPLE)]
    else:
        cmd = [sys.executable, str(EXAMPLE)]
    p = subprocess.run(cmd + FAST + [str(a) for a in args], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"tiny_pretrain failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_many(runs, timeout: float = 400) -> None:
    """Several single-process runs (lists of extra args; or {"merge": {...}} steps, see
    pma_train_driver.py) one after the other in one interpreter."""
    driver = Path(__file__).with_name("pma_train_driver.py")
    items = [r if isinstance(r, dict) else FAST + [str(a) for a in r] for r in runs]
    p = subprocess.run([sys.executable, str(driver), json.dumps(items)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"driver failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def summary(save_dir) -> dict:
    return json.loads((Path(save_dir) / "train_summary.json").read_text())


