"""Static checks of the Slurm scripts (no cluster needed)."""

from __future__ import annotations

import re
import subprocess

import pytest

from slurm_helpers import REPO

SCRIPTS = sorted([*(REPO / "slurm").glob("*.sh"), REPO / ".ci" / "slurm_up.sh", REPO / ".ci" / "slurm_down.sh"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "pretrain_pma.sh", "merge_pma.sh", "grpo_lopti.sh", "slurm_up.sh", "slurm_down.sh"} <= names


@pytest.mark.parametrize("script,knobs", [
    ("pretrain_pma.sh", ["SAVE_DIR", "TRAIN_SCRIPT", "TRAIN_ARGS", "GPUS_PER_NODE", "PMA_NUM_MODELS", "PMA_METHOD",
                         "PMA_MODE", "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "PYTHON", "VENV", "AUTO_RESUBMIT",
                         "EXIT_DURATION_MINS"]),
    ("merge_pma.sh", ["OUTPUT", "INPUTS", "SAVE_DIR", "NUM_MODELS", "METHOD", "MERGE_ARGS"]),
    ("grpo_lopti.sh", ["NEMO_RL_DIR", "CONFIG", "CONTAINER_IMAGE", "GPUS_PER_NODE"]),
])
def test_every_knob_is_documented_and_read(script, knobs):
    text = (REPO / "slurm" / script).read_text()
    header = text.split("set -euo pipefail", 1)[0]
    common = (REPO / "slurm" / "common.sh").read_text()
    for k in knobs:
        assert re.search(rf"^#\s+{k}\b", header, re.M), f"{script}: knob {k} not documented in the header"
        assert re.search(rf"\${{{k}\b|\${k}\b", text + common), f"{script}: knob {k} never read"


def test_sbatch_scripts_are_executable():
    for name in ("pretrain_pma.sh", "merge_pma.sh", "grpo_lopti.sh"):
        assert (REPO / "slurm" / name).stat().st_mode & 0o111, name
