"""The slurm/ scripts, submitted with sbatch to a real two-node Slurm (.ci/slurm_up.sh) and waited for.

One chain of tiny pretraining jobs (2 nodes, TP=2 across them, gloo) is shared by the module:
job A trains iterations 0 -> 2 and stops early (Megatron-LM's --exit-interval, emulated by
budget_pretrain.py), then resubmits itself with --dependency=singleton (AUTO_RESUBMIT=1); job B resumes
from the tracker and trains 2 -> 4. PMA (hook mode, 2 models) merges after the saves (2 and 4).
Then job C (watcher mode, 4 -> 5) is submitted and runs while the merge test's job runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from slurm_helpers import REPO, dcp_metadata, dcp_tensors, job_env, resubmitted_job, submit, tracker

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--num-val-windows 4 --log-interval 1 --lr-warmup-iters 1 --threads 1")


def _ckpt(save: Path, it: int) -> Path:
    return save / f"iter_{it:07d}"


def _t(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_pretrain")
    save = root / "save"
    env = job_env(
        SAVE_DIR=save, TRAIN_SCRIPT="tests/slurm/budget_pretrain.py", PMA_LAUNCHER="none",
        GPUS_PER_NODE=0, PMA_NUM_MODELS=2, PMA_METHOD="sma", PMA_MODE="hook", AUTO_RESUBMIT=1,
        TRAIN_ARGS=f"{TINY} --tp 2 --train-iters 4 --save-interval 2 --exit-interval 2",
    )
    t0 = time.monotonic()
    a = submit("pretrain_pma.sh", root / "logs", "--nodes=2", "--time=30", "--job-name=pma-test-chain",
               env=env)
    a.wait(timeout=240)
    b = resubmitted_job(a)
    if b is not None:
        b.wait(timeout=240)
    after_b = {"tracker": tracker(save), "pma_tracker": tracker(save / "pma"),
               "pma": sorted(p.name for p in (save / "pma").glob("iter_*")),
               "summary": json.loads((save / "train_summary.json").read_text())
               if (save / "train_summary.json").exists() else {}}
    # job C: a later, manual submission in watcher mode; runs while the merge test runs
    env_c = job_env(
        SAVE_DIR=save, TRAIN_SCRIPT="examples/tiny_pretrain.py", GPUS_PER_NODE=0, PMA_NUM_MODELS=2,
        PMA_MODE="watcher", WATCH_POLL_SECS=1, TRAIN_ARGS=f"{TINY} --tp 2 --train-iters 5 --save-interval 1",
    )
    c = submit("pretrain_pma.sh", root / "logs", "--nodes=2", env=env_c) if after_b["tracker"] == 4 else None
    yield {"root": root, "save": save, "a": a, "b": b, "c": c, "after_b": after_b,
           "seconds": time.monotonic() - t0}
    if c is not None:  # never leave job C behind, whichever tests ran
        c.wait(timeout=240)


def test_pretrain_two_nodes_completes_and_every_rank_writes(chain):
    a, save = chain["a"], chain["save"]
    assert a.state == "COMPLETED", a.describe()
    assert a.info()["NodeList"] == "n[1-2]"
    text = a.text()
    # one torchrun per node, node rank from SLURM_NODEID
    assert "node n1: node rank 0 of 2" in text and "node n2: node rank 1 of 2" in text, a.describe()
    # exit duration: the job's 30 min minus the 10 min margin, so that the final save fits in the job
    assert re.search(r"--exit-duration-in-mins (19|20)\b", text), a.describe()
    for it in (2, 4):
        ck = _ckpt(save, it)
        assert (ck / "metadata.json").is_file(), f"{ck} incomplete\n{a.describe()}"
        md = dcp_metadata(ck)
        files = {s.relative_path for s in md.storage_data.values()}
        writers = {f.split("_")[2] for f in files if f.startswith("__")}
        assert {"0", "1"} <= writers, f"not every rank wrote data to {ck}: {sorted(files)}"
        for f in files:
            assert (ck / f).stat().st_size > 0


def test_auto_resubmit_chains_and_resumes_from_tracker(chain):
    a, b, save = chain["a"], chain["b"], chain["save"]
    assert b is not None, f"job A did not resubmit itself\n{a.describe()}"
    assert b.state == "COMPLETED", b.describe()
    ia, ib = a.info(), b.info()
    assert ib["JobName"] == ia["JobName"] == "pma-test-chain"
    assert ib["NumNodes"] == "2"
    assert ib["TimeLimit"] == ia["TimeLimit"] == "00:30:00"
    assert _t(ib["StartTime"]) >= _t(ia["EndTime"]), "singleton: B must start after A ended"
    assert "loaded" in b.text() and "iteration 2" in b.text(), b.describe()
    # B computed its own rendezvous (A's MASTER_ADDR/MASTER_PORT must not leak through the environment)
    assert f"rendezvous n1:{20000 + b.id % 20000}" in b.text(), b.describe()
    assert chain["after_b"]["tracker"] == 4
    summary = chain["after_b"]["summary"]
    assert summary.get("start_iteration") == 2 and summary.get("iteration") == 4, summary
    assert "training finished (iteration 4 >= 4)" in b.text()
    assert resubmitted_job(b) is None
    assert (_ckpt(save, 4) / "metadata.json").is_file()
    assert not _ckpt(save, 3).exists()


def test_pma_merges_exist_load_and_average(chain):
    save = chain["save"]
    pma = save / "pma"
    # hook mode: job A's save (2) has no window of 2 yet; job B's save (4) merges [2, 4] before B exits
    assert chain["after_b"]["pma"] == ["iter_0000004"], chain["b"].describe()
    assert chain["after_b"]["pma_tracker"] == 4
    out = _ckpt(pma, 4)
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == [2, 4]
    merged = dcp_tensors(out)
    older, newer = dcp_tensors(_ckpt(save, 2)), dcp_tensors(_ckpt(save, 4))
    assert merged and set(merged) <= set(newer)
    for k, v in merged.items():
        expect = (older[k].double() + newer[k].double()) / 2
        assert torch_allclose(v, expect), k
    r = subprocess.run([sys.executable, "-m", "megatron_pma", "inspect", str(_ckpt(pma, 4))],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "iteration 4" in r.stdout


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a.double(), b, rtol=1e-6, atol=1e-7)


def test_merge_script_on_two_nodes_matches_one_process(chain, tmp_path):
    save = chain["save"]
    inputs = " ".join(str(_ckpt(save, i)) for i in (2, 4))
    out_multi = tmp_path / "multi" / "merged"
    env = job_env(OUTPUT=out_multi, INPUTS=inputs, METHOD="wma")
    job = submit("merge_pma.sh", tmp_path / "logs", "--nodes=2", "--ntasks-per-node=2", env=env)

    # the reference, one process, while the job runs
    out_single = tmp_path / "single" / "merged"
    out_single.parent.mkdir()
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             and not k.startswith("SLURM_")}
    ref = subprocess.Popen([sys.executable, "-m", "megatron_pma", "merge", "--method", "wma", "--quiet",
                            "--output", str(out_single), *inputs.split()], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env=clean)
    job.wait(timeout=180)
    _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err
    assert job.state == "COMPLETED", job.describe()
    assert "4 task(s) on 2 node(s)" in job.text()
    prov = json.loads((out_multi / "pma_provenance.json").read_text())
    assert prov["processes"] == 4, prov
    a, b = dcp_tensors(out_multi), dcp_tensors(out_single)
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].equal(b[k]), f"{k} differs between 4 ranks on 2 nodes and one process"


def test_watcher_mode_resumes_and_stops_the_sidecar(chain):
    """A later, manual submission resumes from the tracker (4 -> 5); PMA_MODE=watcher runs
    `megatron-pma watch` as a sidecar step that merges the final window, then stops it with SIGTERM."""
    save, job = chain["save"], chain["c"]
    assert job is not None, "job C was not submitted (the chain did not reach iteration 4)"
    job.wait(timeout=240)
    assert job.state == "COMPLETED", job.describe()
    text = job.text()
    assert "loaded" in text and "iteration 4" in text, job.describe()
    assert tracker(save) == 5
    assert "--pma-num-models" not in text.split("trainer:", 1)[1].split("\n", 1)[0]
    for line in ("watcher started", "[megatron-pma watch] watching", "[megatron-pma watch] merged iteration 5",
                 "the watcher merged the final window", "stopping the watcher (SIGTERM)",
                 "[megatron-pma watch] stopped", "watcher exited with status 0"):
        assert line in text, f"missing {line!r}\n{job.describe()}"
    out = _ckpt(save / "pma", 5)
    assert (out / "metadata.json").is_file(), job.describe()
    prov = json.loads((out / "pma_provenance.json").read_text())
    assert [i["iteration"] for i in prov["inputs"]] == [4, 5]
    assert tracker(save / "pma") == 5
    # nothing of the job is left running
    r = subprocess.run(["squeue", "-h", "-s", "-j", str(job.id)], capture_output=True, text=True, timeout=15)
    assert r.stdout.strip() == ""


def test_grpo_lopti_orchestration_with_stub_ray(tmp_path):
    """slurm/grpo_lopti.sh needs GPUs and NeMo-RL; here `ray` and the driver are stand-ins
    (tests/slurm/stubs) so that the Slurm side runs for real on 2 nodes: Ray head on the first host,
    a worker step on the other, the wait for all nodes, the driver on the head with the overrides,
    and SIGTERM to the Ray steps at the end."""
    stub_dir = tmp_path / "ray"
    stub_dir.mkdir()
    nemo = tmp_path / "NeMo-RL"
    nemo.mkdir()
    stubs = REPO / "tests" / "slurm" / "stubs"
    env = job_env(NEMO_RL_DIR=nemo, RUN_SCRIPT=stubs / "grpo_driver.py", RAY=stubs / "ray", STUB_RAY_DIR=stub_dir,
                  GPUS_PER_NODE=1, LOPTI_ETA=0.4, AR_ALPHA=0.1, RAY_HEAD_WAIT_SECS=1, RAY_WAIT_SECS=60,
                  RESULTS_DIR=tmp_path / "results", OVERRIDES="grpo.max_num_steps=3")
    job = submit("grpo_lopti.sh", tmp_path / "logs", "--nodes=2", env=env, script_args=("policy.model_name=tiny",))
    job.wait(timeout=120)
    assert job.state == "COMPLETED", job.describe()
    d = json.loads((stub_dir / "driver.json").read_text())
    assert d["node"] == "n1" and d["cwd"] == str(nemo)
    assert d["nodes_seen"] == ["node_n1", "node_n2"], d
    assert d["ray_address"].endswith(":6379")
    assert str(REPO) in d["pythonpath"].split(":")
    argv = d["argv"]
    assert argv[argv.index("--config") + 1] == str(REPO / "examples" / "rl" / "grpo_lopti_nemo_rl.yaml")
    assert argv[argv.index("--nemo-rl-root") + 1] == str(nemo)
    for o in ("cluster.num_nodes=2", "cluster.gpus_per_node=1", "loss_fn.lopti_eta=0.4",
              "loss_fn.advantage_reweight_alpha=0.1", "grpo.max_num_steps=3", "policy.model_name=tiny",
              f"checkpointing.checkpoint_dir={tmp_path / 'results' / 'checkpoints'}"):
        assert o in argv, (o, argv)
    assert "--head" in (stub_dir / "node_n1").read_text()
    assert "--address=" in (stub_dir / "node_n2").read_text()
    assert (stub_dir / "stopped_n1").read_text().strip() == "stopped head"
    assert (stub_dir / "stopped_n2").read_text().strip() == "stopped worker"


def test_missing_save_dir_fails_fast_with_one_line(tmp_path):
    t0 = time.monotonic()
    job = submit("pretrain_pma.sh", tmp_path, "--nodes=2", env=job_env(TRAIN_SCRIPT="examples/tiny_pretrain.py",
                                                                        GPUS_PER_NODE=0))
    job.wait(timeout=60)
    assert job.state == "FAILED" and job.exit_code == 2, job.describe()
    lines = [ln for ln in job.text().splitlines() if ln.strip()]
    assert len(lines) == 1, job.describe()
    assert lines[0].startswith("pretrain_pma.sh: error: SAVE_DIR is required"), lines
    assert time.monotonic() - t0 < 30


def test_other_missing_inputs_fail_fast(tmp_path):
    bad = submit("pretrain_pma.sh", tmp_path, env=job_env(SAVE_DIR=tmp_path / "s", TRAIN_SCRIPT="nope/missing.py"))
    nomerge = submit("merge_pma.sh", tmp_path, env=job_env(SAVE_DIR=tmp_path / "s"))
    nogrpo = submit("grpo_lopti.sh", tmp_path, env=job_env())
    nopyxis = submit("pretrain_pma.sh", tmp_path, env=job_env(SAVE_DIR=tmp_path / "s", CONTAINER_IMAGE="nvcr.io/x:1"))
    for job, msg in ((bad, "pretrain_pma.sh: error: TRAIN_SCRIPT not found:"),
                     (nomerge, "merge_pma.sh: error: OUTPUT is required"),
                     (nogrpo, "grpo_lopti.sh: error: NEMO_RL_DIR is required"),
                     (nopyxis, "pretrain_pma.sh: error: CONTAINER_IMAGE is set but this Slurm has no pyxis")):
        job.wait(timeout=60)
        assert job.state == "FAILED" and job.exit_code == 2, job.describe()
        lines = [ln for ln in job.text().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(msg), job.describe()


def test_slurm_up_is_idempotent():
    """A second .ci/slurm_up.sh on a healthy cluster leaves it as it is (and says so, quickly)."""
    if os.geteuid() != 0:
        pytest.skip("slurm_up.sh needs root")
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "already up" in r.stdout and "n[1-2]" in r.stdout, r.stdout
    assert time.monotonic() - t0 < 15
