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


def _signal_step_with_fake_squeue(tmp_path, squeue_failures: int):
    """pma_signal_step with stand-ins for squeue (fails its first N calls, as a busy slurmctld can;
    a real one cannot be made to fail on demand) and scancel (records its arguments)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/bash\n"
        f"n=$(cat {calls}.squeue 2>/dev/null || echo 0); echo $((n + 1)) > {calls}.squeue\n"
        f"if [ $n -lt {squeue_failures} ]; then echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1; fi\n"
        "echo '28.batch batch'; echo '28.0 pma-watch'; echo '28.1 train'\n")
    (bin_dir / "scancel").write_text(f"#!/bin/bash\necho \"$*\" >> {calls}.scancel\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = f"PMA_SCRIPT_NAME=test; source {REPO / 'slurm' / 'common.sh'}; pma_signal_step pma-watch TERM"
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "28"})
    scancel = (tmp_path / "calls.scancel").read_text() if (tmp_path / "calls.scancel").exists() else ""
    return r, scancel


def test_signal_step_retries_a_failed_squeue(tmp_path):
    """A failed squeue is asked again (before: the watcher's step was cancelled instead of signalled,
    and the watcher exited 143 instead of 0)."""
    r, scancel = _signal_step_with_fake_squeue(tmp_path, squeue_failures=2)
    assert r.returncode == 0, r.stderr
    assert scancel.split() == ["--signal=TERM", "28.0"]


def test_signal_step_gives_up_after_five_failed_queries(tmp_path):
    r, scancel = _signal_step_with_fake_squeue(tmp_path, squeue_failures=99)
    assert r.returncode == 1 and scancel == ""
    assert "no step named pma-watch found (squeue: slurm_load_jobs error: Socket timed out)" in r.stderr
