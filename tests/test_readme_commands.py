"""The README's commands run as written, in order, from the state the README leaves you in.

Every indented command block of README.md that uses the reader's run (a word ``RUN``) is run by bash
in a fresh folder, one command after the other, with the venv "activated" (its ``bin/`` first on
PATH, as ``. .venv/bin/activate`` does): the quick start's training run, inspect, the merges, the
watcher, PMA-init (a)-(c). Each must exit 0; a collision between examples ("already exists"), a
folder that does not exist or a placeholder left in a command fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_blocks(text: str) -> list[list[str]]:
    """Indented (4-space) code blocks, each a list of commands (``\\`` continuations joined)."""
    blocks, current, prev_blank = [], None, True
    for line in text.splitlines():
        if line.startswith("    ") and (current is not None or prev_blank):
            if current is None:
                current = []
                blocks.append(current)
            current.append(line[4:])
        elif line.strip():
            current = None
        prev_blank = not line.strip()
    commands = []
    for block in blocks:
        joined = "\n".join(block).replace("\\\n", " ")
        commands.append([c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")])
    return commands


def runnable_commands() -> list[str]:
    uses_run = re.compile(r"\bRUN\b")
    return [cmd for block in readme_blocks((REPO / "README.md").read_text())
            if any(uses_run.search(c) for c in block) for cmd in block]


def test_readme_block_parser():
    blocks = readme_blocks("text\n\n    a \\\n        b\n    # c\n    d\n\nmore\n    not code\n")
    assert blocks == [["a      b", "d"]]


def test_the_runnable_commands_are_the_ones_around_run():
    cmds = runnable_commands()
    assert cmds[0].startswith("python examples/tiny_pretrain.py --save RUN ")
    assert any(c.startswith("megatron-pma inspect RUN") for c in cmds)
    assert any("--save-dir RUN" in c for c in cmds) and any(c.startswith("megatron-pma watch") for c in cmds)
    code = [c.split(" #")[0] for c in cmds]  # comments may say anything
    assert not any("..." in c or "<" in c or " [" in c for c in code), "placeholders cannot run as written"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(Path(venv_bin).parent),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    outputs = []
    for cmd in runnable_commands():
        r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
    assert "PMA: merged 5 checkpoints -> RUN/pma/iter_0000500" in outputs[0]  # the hook's merges are logged
    for out in ["RUN/pma", "MERGED/ema", "MERGED/tokens", "MERGED/lawa", "MERGED/sma", "MERGED/sma-torchrun",
                "WATCHED", "INIT", "RESUME"]:
        assert (tmp_path / out / "iter_0000500" / "metadata.json").is_file(), out
    assert (tmp_path / "RECOVER" / "iter_0000400" / "metadata.json").is_file()
    for save, last in [("CT", 100), ("RUN2", 600), ("RUN_AFTER", 500)]:
        assert (tmp_path / save / "latest_checkpointed_iteration.txt").read_text().strip() == str(last), save
