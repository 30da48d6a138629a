"""patches/megatron-lm/0001-pma-hook.patch against the megatron/training/ files of the
megatron-core 0.19.2 wheel (= Megatron-LM core_r0.19.0): it applies with ``git apply`` (exact
context, no fuzz; ``patch -p1`` too), the patched files compile, and the patched Megatron-LM code
really calls the PMA hook after the tracker write -- sync and async -- with the --pma-* options
parsed by its own argument parser.

Megatron-LM main (0.20.0-dev) is not in CI (no network for a checkout, and its source is not ours to
commit). Checked by hand at d98e8a6 (2026-12-05): ``git show HEAD:megatron/training/{arguments,
checkpointing}.py`` of a github:NVIDIA/Megatron-LM snapshot into ``megatron/training/`` of an empty
``git init`` tree, then ``git apply --check -v`` (all hunks apply, at offsets: the helper now goes
before ``# Track deletion processes to prevent zombies``, whose context main shares, not after
``_deletion_processes = []``, which main follows with ``_maybe_compact_rollout_bank``), ``git apply``,
``py_compile`` and ``git apply -R --check``; the hook call lands right after the tracker write in
``save_checkpoint``'s ``iter_finalize_fn``, where ``save_dir``, ``iteration`` and ``release`` are
defined. ``test_patch_applies_to_a_megatron_lm_checkout`` repeats that on a checkout named by
``$PMA_MEGATRON_LM_SRC`` (skipped when unset).
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DRIVER, MCORE_VERSION, REPO, subprocess_env

PATCH = REPO / "patches" / "megatron-lm" / "0001-pma-hook.patch"
FILES = ("megatron/training/arguments.py", "megatron/training/checkpointing.py")


def git_apply(tree: Path, *flags: str) -> subprocess.CompletedProcess:
    """``git apply`` of the patch in ``tree`` (its own repository, so paths are relative to it)."""
    if not (tree / ".git").exists():
        subprocess.run(["git", "init", "-q", str(tree)], check=True)
    return subprocess.run(["git", "apply", "-v", *flags, str(PATCH)], cwd=tree, capture_output=True, text=True)


@pytest.fixture(scope="module")
def patched_tree(mcore_0192_site, tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("patched")
    # megatron/ is a namespace package: a tree holding only megatron/training, placed before
    # the 0.19.2 site on sys.path, overrides megatron.training and keeps megatron.core.
    shutil.copytree(mcore_0192_site / "megatron" / "training", root / "megatron" / "training")
    for flags in (["--check"], []):
        r = git_apply(root, *flags)
        assert r.returncode == 0, f"git apply {flags} failed:\n{r.stdout}\n{r.stderr}"
        assert "offset" not in r.stderr and "fuzz" not in r.stderr, r.stderr  # exact fit
    return root


def test_patch_applies_with_patch_p1_too(mcore_0192_site, tmp_path):
    if shutil.which("patch") is None:
        pytest.skip("the `patch` program is not installed")
    shutil.copytree(mcore_0192_site / "megatron" / "training", tmp_path / "megatron" / "training")
    r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--dry-run"], stdin=PATCH.open(), cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "fuzz" not in r.stdout and "offset" not in r.stdout, r.stdout + r.stderr


def test_patch_applies_to_a_megatron_lm_checkout(tmp_path):
    """``$PMA_MEGATRON_LM_SRC``: a Megatron-LM checkout (e.g. main); see the module docstring."""
    src = os.environ.get("PMA_MEGATRON_LM_SRC")
    if not src:
        pytest.skip("set PMA_MEGATRON_LM_SRC to a Megatron-LM checkout to check the patch against it")
    for rel in FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(src) / rel, tmp_path / rel)
    for flags in (["--check"], [], ["-R", "--check"]):
        r = git_apply(tmp_path, *flags)
        assert r.returncode == 0, f"git apply {flags} failed:\n{r.stdout}\n{r.stderr}"
    for rel in FILES:
        py_compile.compile(str(tmp_path / rel), doraise=True)


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
    r = git_apply(copy, "-R", "--check")
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
