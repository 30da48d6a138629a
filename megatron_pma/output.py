"""The publishing half of a merge, whatever the layout and format: checks on the output path,
the staging folder, provenance, trackers, the progress bar.

Formats write tensors into the staging folder; everything here happens before they start or
after they finished, on every rank where it says so and on rank 0 otherwise.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from megatron_pma import __version__
from megatron_pma.checkpoint import publish
from megatron_pma.checkpoint.discovery import ITER_DIR, iteration_from_name
from megatron_pma.errors import PMAError
from megatron_pma.parallel import Group


def writes_trackers(output: Path, update_tracker: bool | None) -> bool:
    """An output named ``iter_XXXXXXX`` makes its parent a save dir whose trackers we write."""
    return update_tracker is not False and bool(ITER_DIR.match(Path(output).name))


def check_output(output: Path, plan, force: bool, update_tracker: bool | None) -> None:
    """The output may be created: not an input, not inside one, not existing (unless ``force``)."""
    real = output.resolve()
    for c in plan.inputs:
        src = c.outer.resolve()
        if real == src or src in real.parents:
            raise PMAError(f"{output}: output would overwrite or nest inside input {c.label}")
        if real in src.parents:
            raise PMAError(f"{output}: output would replace a folder holding input {c.label}")
    if output.exists() and not force:
        raise PMAError(f"{output}: already exists (use --force to replace it)")
    if not output.parent.exists():
        raise PMAError(f"{output.parent}: output's parent directory does not exist")
    if not os.access(output.parent, os.W_OK):
        raise PMAError(f"{output.parent}: permission denied (cannot write the output)")
    plan.newest.layout.check_output(output, plan.iteration, writes_trackers(output, update_tracker))


def open_staging(output: Path, group: Group, subdirs: list[Path]) -> publish.Staging:
    """Rank 0 creates the hidden staging folder (and ``subdirs`` inside) before anyone writes."""
    staging = publish.Staging(output, group.broadcast(f"{os.getpid()}-{uuid.uuid4().hex[:8]}"))
    error = None
    if group.rank == 0:
        try:
            staging.create()
            for d in subdirs:
                (staging.path / d).mkdir(parents=True)
        except OSError as e:
            error = f"{output.parent}: cannot create the staging folder ({e.strerror})"
    error = group.first_error(error)  # doubles as the barrier
    if error:
        if group.rank == 0:
            staging.release()
        raise PMAError(error)
    return staging


def provenance(plan, alpha: float, output: Path, world: int, seconds: float, **extra) -> dict:
    """``pma_provenance.json`` of a merge plan (any format): what was merged, how, by whom."""
    return {
        "tool": "megatron-pma",
        "version": __version__,
        **{k: v for k, v in extra.items() if k == "format"},
        "method": plan.method,
        "alpha": alpha if plan.method == "ema" else None,
        "optimizer": plan.optimizer,
        "inputs": [{"path": str(c.outer.resolve()), "iteration": c.iteration, "weight": w}
                   for c, w in zip(plan.inputs, plan.weights)],
        "iteration": plan.iteration,
        **({"newest_input_iteration": plan.newest.iteration} if plan.restamped else {}),
        "output": str(output),
        **{k: v for k, v in extra.items() if k != "format"},
        "processes": world,
        "seconds": round(seconds, 3),
        "host": socket.gethostname(),
        "created_unix": round(time.time(), 3),
    }


def update_trackers(layout, output: Path, iteration: int, update_tracker: bool | None, fsync: bool) -> None:
    """After publishing: point the output's save dir at it (``None``: never backwards)."""
    if not writes_trackers(output, update_tracker):
        return
    current = layout.read_tracker(output.parent)
    if update_tracker is None and isinstance(current, int) and current > iteration:
        return  # never move a save dir's tracker backwards unless asked
    layout.write_trackers(output.parent, iteration_from_name(output), output, fsync=fsync)


def make_progress(enabled: bool, total: int):
    """(update(nbytes), close()) of a progress bar on stderr, or no-ops."""
    if not enabled:
        return lambda n: None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
               dynamic_ncols=True, leave=False)
    return bar.update, bar.close


def local_world(group: Group) -> int:
    """Processes of this merge on this node (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", group.world)) or 1)
