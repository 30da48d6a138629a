"""patches/megatron-lm/0001-pma-hook.patch against the megatron/training/ files of the
megatron-core 0.19.2 wheel: it applies cleanly (``patch -p1 --dry-run``, then for real, in a
temp copy), the patched files compile, and the patched Megatron-LM code really calls the PMA
hook after the tracker write -- sync and async -- with the --pma-* options parsed by its own
argument parser."""

from __future__ import annotations

import ast
import json
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DRIVER, MCORE_VERSION, REPO, subprocess_env

PATCH = REPO / "patches" / "megatron-lm" / "0001-pma-hook.patch"
FILES = ("megatron/training/arguments.py", "megatron/training/checkpointing.py")


@pytest.fixture(scope="module")
def patched_tree(mcore_0192_site, tmp_path_factory) -> Path:
    if shutil.which("patch") is None:
        pytest.skip("the `patch` program is not installed")
    root = tmp_path_factory.mktemp("patched")
    # megatron/ is a namespace package: a tree holding only megatron/training, placed before
    # the 0.19.2 site on sys.path, overrides megatron.training and keeps megatron.core.
    shutil.copytree(mcore_0192_site / "megatron" / "training", root / "megatron" / "training")
    for dry in (True, False):
        r = subprocess.run(["patch", "-p1", "--forward", "--batch"] + (["--dry-run"] if dry else []),
                           stdin=PATCH.open(), cwd=root, capture_output=True, text=True)
        assert r.returncode == 0, f"patch{' --dry-run' if dry else ''} failed:\n{r.stdout}\n{r.stderr}"
        assert "offset" not in r.stdout and "fuzz" not in r.stdout, r.stdout  # exact fit
    return root


def test_patch_applies_and_compiles(patched_tree, mcore_0192_site):
    for rel in FILES:
        py_compile.compile(str(patched_tree / rel), doraise=True)
        assert (patched_tree / rel).read_text() != (mcore_0192_site / rel).read_text()
    # The hook call sits in iter_finalize_fn, right after the `with open(tracker_filename, 'w')`.
    tree = ast.parse((patched_tree / FILES[1]).read_text())
    save = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "save_checkpoint")
    fins = [n for n in ast.walk(save) if isinstance(n, ast.FunctionDef) and n.name == "iter_finalize_fn"]
    found = False
    for fn in fins:
        for i, stmt in enumerate(fn.body[:-1]):
            if isinstance(stmt, ast.With) and "tracker_filename" in ast.unparse(stmt.items[0]) \
                    and "'w'" in ast.unparse(stmt.items[0]):
                nxt = ast.unparse(fn.body[i + 1])
                found = found or "_pma_on_checkpoint_saved(args, save_dir, iteration)" in nxt
    assert found, "hook call is not right after the tracker write"
    # megatron_pma is imported lazily (inside the function), never at module level.
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "megatron_pma" in ast.unparse(n)
                   for n in tree.body)


def test_patch_reverses_cleanly(patched_tree, tmp_path):
    copy = tmp_path / "t"
    shutil.copytree(patched_tree, copy)
    r = subprocess.run(["patch", "-p1", "-R", "--batch", "--dry-run"], stdin=PATCH.open(), cwd=copy,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# Both modes run the same patched line (inside iter_finalize_fn); async is the harder path.
@pytest.mark.parametrize("mode", [pytest.param("patched-sync", marks=pytest.mark.slow), "patched-async"])
def test_patched_megatron_calls_hook_after_tracker(patched_tree, mcore_0192_site, tmp_path, mode):
    save = tmp_path / "save"
    env = subprocess_env(patched_tree, mcore_0192_site)
    r = subprocess.run([sys.executable, str(DRIVER), mode, str(save), "10", "20", "30",
                        "--pma-num-models", "2", "--pma-method", "custom", "--pma-alpha", "0.3",
                        "--pma-weights", "0.25,0.75", "--pma-interval-iters", "10",
                        "--pma-output-root", str(tmp_path / "m")],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(lines[-1])
    assert out["version"] == MCORE_VERSION
    assert out["patched_file"].startswith(str(patched_tree))
    [hook] = out["hooks"]
    assert hook == {"save_dir": str(save), "num_models": 2, "method": "custom", "alpha": 0.3,
                    "weights": [0.25, 0.75], "interval_iters": 10, "interval_tokens": None,
                    "optimizer": "drop", "output_root": str(tmp_path / "m"), "calls": [10, 20, 30]}
    assert [f["iteration"] for f in out["fired"]] == [10, 20, 30]
    for f in out["fired"]:
        assert f["tracker"] == str(f["iteration"]) and f["complete"]
    if mode == "patched-async":
        assert out["events"] == [["saved", 10, 0], ["saved", 20, 1], ["saved", 30, 2]]
    else:
        assert out["events"] == [["saved", 10, 1], ["saved", 20, 2], ["saved", 30, 3]]
