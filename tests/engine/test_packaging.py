"""Packaging: the engine's hard dependencies (pyproject's ``dependencies``) are exactly what merge and
inspect import, and a command whose optional dependencies are missing says which extra to install.

The "bare install" is real, not simulated: a Python started without site-packages (``-S``) that
sees only this repository and the distributions pyproject lists, linked from the venv.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _dependencies() -> list[str]:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # one name per distribution (ml-dtypes has one entry per Python range)
    return sorted({re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]})


# Each hard dependency and the top-level modules it installs (a Bridge run_config.yaml needs yaml).
HARD = {"numpy": ("numpy", "numpy.libs"), "tqdm": ("tqdm",), "pyyaml": ("yaml", "_yaml"),
        "ml-dtypes": ("ml_dtypes",)}


def test_hard_dependencies_are_what_the_engine_imports():
    assert sorted(_dependencies()) == sorted(HARD)


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """A folder holding only the hard dependencies (symlinks into this venv's site-packages)."""
    site = Path(sysconfig.get_paths()["purelib"])
    bare = tmp_path_factory.mktemp("bare-site")
    for dist in _dependencies():
        for name in HARD[dist]:  # numpy.libs: the wheel's bundled OpenBLAS
            if (site / name).exists():
                (bare / name).symlink_to(site / name)
    return bare


def _bare_cli(bare: Path, *args) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path[:0] = [{bare!r}, {repo!r}]\n"
            "from megatron_pma.cli import main\n"
            "rc = main({args!r})\n"
            "leaked = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'megatron', 'matplotlib', 'psutil'}})\n"
            "assert not leaked, leaked\n"
            "sys.exit(rc)\n").format(bare=str(bare), repo=str(REPO), args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "MEGATRON_PMA_WORKERS": "1"})


def test_bare_install_has_no_torch(bare_site):
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(bare_site)!r}]; "
                        "import numpy, tqdm; import torch"], capture_output=True, text=True)
    assert "No module named 'torch'" in r.stderr


def test_merge_and_inspect_with_hard_dependencies_only(bare_site, gpt_tp2, tmp_path):
    out = tmp_path / "new" / "iter_0000030"
    r = _bare_cli(bare_site, "merge", *gpt_tp2, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "metadata.json").is_file()
    r = _bare_cli(bare_site, "inspect", gpt_tp2[0].parent)
    assert r.returncode == 0, r.stderr
    assert "iter_0000030" in r.stdout


def test_demo_says_which_extra_it_needs(bare_site, tmp_path):
    r = _bare_cli(bare_site, "demo", "--quick", "--out", tmp_path / "d")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("megatron-pma demo needs torch, megatron-core and matplotlib: "
                                "pip install 'megatron-pma[demo]'")
    assert not (tmp_path / "d").exists()


def test_legacy_merge_says_which_extra_it_needs(bare_site, legacy_bf16, tmp_path):
    """Legacy --ckpt-format torch files are rewritten with torch.save: torch is needed there."""
    r = _bare_cli(bare_site, "merge", *legacy_bf16, "-o", tmp_path / "new" / "m", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "megatron-pma merge needs torch: pip install 'megatron-pma[train]'"
    assert not (tmp_path / "new").exists()
