"""Fixtures for the training tests: real tiny Megatron-Core runs (gloo) through the example."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pma_train_helpers import run_many, run_pretrain  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory):
    """torchrun, 2 ranks, TP=2: 30 iterations, a checkpoint every 10 (with optimizer state), and the
    PMA hook merging the last 3 with averaged optimizer state into <save>/pma."""
    save = tmp_path_factory.mktemp("base") / "run"
    run_pretrain(["--save", save, "--tp", "2", "--train-iters", "30", "--save-interval", "10",
                  "--pma-num-models", "3", "--pma-optimizer", "average"], nproc=2)
    return save


@pytest.fixture(scope="session")
def pma_init_runs(tiny_pretrain_run, tmp_path_factory):
    """From tiny_pretrain_run, in one process (world size 1, TP=1): an exact resume from iteration 20, PMA-init
    with weights only (--finetune) from the hook's merge, and a resume from that merge with its
    averaged optimizer state. Returns their save dirs."""
    root = tmp_path_factory.mktemp("pma_init")
    dirs = {"resumed": root / "resumed", "ct": root / "ct", "resume_merge": root / "resume_merge"}
    run_many([
        ["--load", tiny_pretrain_run, "--ckpt-step", "20", "--save", dirs["resumed"], "--train-iters", "30",
         "--save-interval", "10"],
        ["--load", tiny_pretrain_run / "pma", "--finetune", "--save", dirs["ct"], "--train-iters", "20",
         "--save-interval", "10"],
        ["--load", tiny_pretrain_run / "pma", "--save", dirs["resume_merge"], "--train-iters", "45",
         "--save-interval", "15"],
    ])
    return dirs
