"""An optimizer saved as a plain torch DCP beside safetensors weights (NeMo-RL's DTensor backend:
NeMo Automodel's ``save_optimizer`` writes ``<optimizer_path>/optim`` with
``torch.distributed.checkpoint``, keys ``optim.state.<param>.exp_avg`` / ``exp_avg_sq`` / ``step``,
``optim.param_groups.*``, ``sched.*``), averaged with torch_dist's planner pieces and writer.

The state holds Adam moments and step counts, no fp32 copy of the weights (FSDP2's parameters
are the weights themselves, merged by the safetensors format). Moments are averaged with the
merge's weights; step counts, param groups and the scheduler are the newest's. It has no
Megatron ``metadata.json`` and no common state, so it is planned here rather than by
:func:`torch_dist.plan_merge`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from megatron_pma import slab_math
from megatron_pma.checkpoint import dcp
from megatron_pma.checkpoint.dcp_types import TensorStorageMetadata
from megatron_pma.errors import PMAError
from megatron_pma.formats import torch_dist

DCP_DIR = "optim"  # Automodel's save_optimizer: os.path.join(weights_path, "optim")
_COUNTER = ".step"  # Adam's step count: a float tensor, never averaged


def plan(inputs: Sequence, weights: Sequence[float], rel: str, method: str) -> torch_dist.MergePlan:
    """``inputs``: the merge's inputs (oldest first; ``.root``, ``.iteration``, ``.layout``);
    ``rel``: where their optimizer folder is (``policy/optimizer``)."""
    loaded = []
    for c in inputs:
        path = Path(c.root) / rel / DCP_DIR
        if not (path / dcp.METADATA_FILE).is_file():
            raise PMAError(f"{c.label}: no {rel}/{DCP_DIR}/{dcp.METADATA_FILE} (saved without its optimizer?); use "
                           "--optimizer drop")
        md = dcp.read_metadata(path)
        dcp.check_pickles(path, md)  # byte objects (param groups, scheduler) are copied from the newest
        loaded.append(torch_dist.InputCheckpoint(path, c.iteration, md, None, c.layout))
    kept = torch_dist.check_layout(loaded, "average")  # same keys, shapes, dtypes and sharding
    newest = loaded[-1]
    jobs = []
    for key in kept:
        entry = newest.metadata.state_dict_metadata[key]
        if not isinstance(entry, TensorStorageMetadata):
            jobs.append(torch_dist.Job(key, None, merge=False))
            continue
        dtype = entry.properties.dtype
        merge = dtype.is_floating_point and not key.endswith(_COUNTER) and len(loaded) > 1
        if merge and not slab_math.supported(dtype):
            raise PMAError(f"{newest.path}: key {key} is {dtype.name}; averaging it is not supported")
        for c in entry.chunks:
            jobs.append(torch_dist.Job(key, tuple(c.offsets), tuple(c.sizes), dtype, merge,
                                       math.prod(c.sizes) * dtype.itemsize))
    copied = [j.index for j in jobs if not j.merge and j.offsets is not None]
    dcp.check_tensor_blobs(newest.path, newest.metadata, copied)  # verbatim copies pass the allowlist too
    n_in = len({info.relative_path for info in newest.metadata.storage_data.values()})
    num_files = max(1, min(n_in, len(jobs)))
    return torch_dist.MergePlan(loaded, list(weights), jobs, num_files, kept, method, "average")


def write(plan: torch_dist.MergePlan, out: Path, group, *, allow_nonfinite: bool, fsync: bool) -> tuple[dict, dict]:
    """This rank's share of the merged DCP files in ``out`` (created by whichever rank comes first)."""
    os.makedirs(out, exist_ok=True)
    quiet = lambda total: (lambda n: None, lambda: None)  # noqa: E731 (the weights' bar covers the merge)
    return torch_dist.write(plan, out, group, allow_nonfinite=allow_nonfinite, progress=quiet, fsync=fsync)


def finish(plan: torch_dist.MergePlan, out: Path, storage: dict, digests: dict) -> None:
    """Rank 0: the DCP metadata, then the newest's other files of the optimizer folder."""
    torch_dist.finish(plan, out, storage, digests, left_out={})
    folder = plan.newest.path.parent
    for entry in os.scandir(folder):
        if entry.name != DCP_DIR:
            target = out.parent / entry.name
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry.path, target)
