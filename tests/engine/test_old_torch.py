"""Merged checkpoints load under an older torch, tensor for tensor as under this one (opt-in).

Our blobs are byte-identical to this torch's ``torch.save`` (tests/engine/test_torch_zip.py), but
torch 2.4 / 2.6 write five zip records where 2.7+ write seven, so for older releases what counts
is that their own reader loads ours. torch 2.4 cannot live in this venv; point
``PMA_OLD_TORCH_PYTHON`` at the python of a venv that has it, e.g.::

    python3.11 -m venv /tmp/t24 && /tmp/t24/bin/pip install torch==2.4.1 numpy==1.26.4
    PMA_OLD_TORCH_PYTHON=/tmp/t24/bin/python pytest tests/engine/test_old_torch.py

(``pip install megatron-pma`` into that venv, or its hard dependencies, also lets the second test run
the merge itself there: numpy 1.x and ml-dtypes 0.5, as in a numpy-1 cluster image.)

Each merged checkpoint is read by that torch's ``torch.distributed.checkpoint`` (its
FileSystemReader, its torch.load of every blob, its unpickling of our ``.metadata``) and by this
one; every tensor's dtype, shape and bytes must agree.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli

OLD = os.environ.get("PMA_OLD_TORCH_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "load_with_this_torch.py"
pytestmark = pytest.mark.skipif(not OLD, reason="opt-in: set PMA_OLD_TORCH_PYTHON to a python with torch 2.4-2.6")


def _digests(python: str, ckpt: Path) -> dict:
    r = subprocess.run([python, str(SCRIPT), str(ckpt)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fixture,args", [
    ("gpt_tp2", []),                                         # fp32, TP=2
    ("gpt_bf16", ["--optimizer", "average"]),                # bf16 weights, fp32 master params and moments
    ("gpt_mcore0192", ["--output-iteration", "40"]),         # 0.19's common state in DCP, restamped
    ("gpt_tp2_distopt", ["--optimizer", "keep-last-moments", "--save-dtype", "bf16"]),
])
def test_merged_checkpoint_loads_under_the_older_torch(fixture, args, request, tmp_path):
    run = request.getfixturevalue(fixture)
    out = tmp_path / "iter_0000040"
    r = cli("merge", *run, "-o", out, "-q", *args)
    assert r.returncode == 0, r.stderr
    old, new = _digests(OLD, out), _digests(sys.executable, out)
    assert old["torch"] != new["torch"], "PMA_OLD_TORCH_PYTHON runs this very torch"
    assert old["tensors"] and old["tensors"] == new["tensors"]


def test_the_engine_under_that_python_writes_the_same_bytes(gpt_bf16, tmp_path):
    """The merge run by that interpreter (this checkout's code; its numpy and ml-dtypes, e.g. numpy 1.26
    and ml-dtypes 0.5 beside torch 2.4) writes the same bytes as here: bf16 rounding included."""
    probe = subprocess.run([OLD, "-c", "import numpy, ml_dtypes, tqdm, yaml; print(numpy.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{OLD} lacks the engine's hard dependencies (pip install megatron-pma there)")
    root = Path(__file__).resolve().parents[2]
    outs = {}
    for name, python in (("old", OLD), ("new", sys.executable)):
        outs[name] = tmp_path / name / "iter_0000030"
        r = subprocess.run([python, "-m", "megatron_pma", "merge", *map(str, gpt_bf16), "-o", str(outs[name]), "-q",
                            "--optimizer", "average", "--workers", "1"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in outs["new"].iterdir() if p.name != "pma_provenance.json")
    assert names == sorted(p.name for p in outs["old"].iterdir() if p.name != "pma_provenance.json")
    match, mismatch, errors = filecmp.cmpfiles(outs["old"], outs["new"], names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)
