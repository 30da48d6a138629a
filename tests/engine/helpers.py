"""Shared helpers for the engine tests: run the CLI, reference merges, tree hashes."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def cli(*args, env=None, timeout=300, preexec_fn=None):
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "megatron_pma", *map(str, args)], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def torchrun_cli(nproc, *args, timeout=300):
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_pma", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest), plus its mode."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            h = hashlib.sha256(p.read_bytes()).hexdigest() if os.access(p, os.R_OK) else "unreadable"
            out[str(p.relative_to(root))] = f"{h}:{oct(p.stat().st_mode)}"
    return out


def reference_merge(tensors: list[dict], weights: list[float]) -> dict:
    """Independent reference: float64 weighted sum of full tensors, cast to the input dtype."""
    ref = {}
    for key, last in tensors[-1].items():
        if last.is_floating_point():
            acc = sum(w * t[key].double() for w, t in zip(weights, tensors))
            ref[key] = acc.to(last.dtype)
        else:
            ref[key] = last
    return ref


def assert_tensors_close(out: dict, ref: dict):
    assert sorted(out) == sorted(ref)
    for key in ref:
        a, b = out[key], ref[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if a.dtype == torch.bfloat16:  # fp32 vs fp64 accumulation may round differently by 1 ulp
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6, msg=key)
        elif a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(a, b), key
