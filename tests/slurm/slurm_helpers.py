"""Submitting the slurm/ scripts to a real (local) Slurm and waiting for them.

The cluster is the one .ci/slurm_up.sh starts: two emulated nodes n1, n2 on this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cluster_problem() -> str | None:
    """None when sinfo works and both nodes are usable, else why not."""
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        return "sinfo not found (Slurm client not installed; run sudo .ci/slurm_up.sh)"
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld not answering; run sudo .ci/slurm_up.sh)"
    if r.returncode != 0:
        return f"sinfo failed: {(r.stderr or r.stdout).strip()} (run sudo .ci/slurm_up.sh)"
    states = {}
    for line in r.stdout.split("\n"):
        if line.strip():
            node, state = line.split()[:2]
            states[node] = state
    good = [n for n, s in states.items() if s.rstrip("*~#").split("+")[0] in ("idle", "mixed", "allocated")]
    if len(good) < 2:
        return f"need 2 usable Slurm nodes, sinfo shows {states or 'none'} (run sudo .ci/slurm_up.sh)"
    return None


@dataclass
class Job:
    id: int
    output: Path

    def info(self) -> dict:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(self.id)], capture_output=True, text=True,
                           timeout=15)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol show job {self.id}: {r.stderr.strip()}")
        info = {}
        for tok in r.stdout.strip().split(" "):
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait(self, timeout: float = 300, poll: float = 0.25) -> "Job":
        """Poll squeue until the job is no longer pending/running; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["squeue", "-h", "-j", str(self.id), "-o", "%T"], capture_output=True, text=True,
                               timeout=15)
            st = r.stdout.strip()
            if r.returncode == 0 and (not st or st in TERMINAL):
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", str(self.id)], timeout=15)
                raise AssertionError(f"job {self.id} still {st or '?'} after {timeout} s; output:\n{self.text()}")
            time.sleep(poll)
        return self

    @property
    def state(self) -> str:
        return self.info()["JobState"]

    @property
    def exit_code(self) -> int:
        return int(self.info()["ExitCode"].split(":")[0])

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output file)"

    def describe(self) -> str:
        i = self.info()
        return (f"job {self.id} {i.get('JobState')} exit {i.get('ExitCode')} on {i.get('NodeList')}\n"
                f"--- {self.output} ---\n{self.text()}")


def job_env(**knobs) -> dict:
    """The test's environment (sbatch exports it) plus the scripts' knobs, using this interpreter."""
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if k != "SLURM_CONF":
            del env[k]
    env.update(PYTHON=sys.executable, VENV="none", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SAVE_DIR", None)
    env.pop("OUTPUT", None)
    for k, v in knobs.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def submit(script: str, out_dir: Path, *sbatch_args: str, env: dict | None = None,
           script_args: tuple[str, ...] = ()) -> Job:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{Path(script).stem}-%j.out"
    cmd = ["sbatch", "--parsable", f"--output={out}", *sbatch_args, str(SLURM_DIR / script), *script_args]
    r = subprocess.run(cmd, cwd=REPO, env=env if env is not None else job_env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"sbatch failed: {' '.join(cmd)}\n{r.stderr}"
    job_id = int(r.stdout.strip().split(";")[0])
    return Job(job_id, Path(str(out).replace("%j", str(job_id))))


def resubmitted_job(job: Job) -> Job | None:
    m = re.search(r"resubmitted as job (\d+)", job.text())
    if not m:
        return None
    jid = int(m.group(1))
    head, sep, tail = job.output.name.rpartition(str(job.id))
    return Job(jid, job.output.with_name(f"{head}{jid}{tail}" if sep else job.output.name))


def tracker(save_dir: Path) -> int | None:
    t = save_dir / "latest_checkpointed_iteration.txt"
    return int(t.read_text().strip()) if t.exists() else None


def dcp_metadata(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt)).read_metadata()


def dcp_tensors(ckpt: Path, prefix_exclude: tuple[str, ...] = ("optimizer.",)) -> dict:
    """Every tensor of a torch_dist checkpoint, read with plain torch.distributed.checkpoint."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp_metadata(ckpt)
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and not k.startswith(prefix_exclude)}
    dcp.load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return sd
