"""The one front door of the merge engine: detect -> plan -> run -> publish.

    merge_checkpoints(inputs, output, method="sma", optimizer="drop", ...)

The *format* of the inputs (:mod:`megatron_pma.formats`: torch_dist, legacy torch) plans the merge
and writes the tensors; their *layout* (:mod:`megatron_pma.layouts`: Megatron-LM, NeMo 2,
Megatron-Bridge) says where the tensor files go, which side files come along and which trackers
point at the result. This module runs the steps in order on every rank, keeps the ranks in step
(an error on one fails all, with the first error's line), and publishes atomically on rank 0.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_pma import formats, hf_export, layouts, output as out
from megatron_pma.checkpoint import publish
from megatron_pma.checkpoint.discovery import ITER_DIR, iteration_from_name
from megatron_pma.errors import PMAError
from megatron_pma.formats.torch_dist import load_input, optimizer_role  # noqa: F401 (inspect's API)
from megatron_pma.names import OPTIMIZER_MODES, PROVENANCE_FILE, SAVE_DTYPES
from megatron_pma.parallel import Group


@dataclass
class MergeResult:
    output: Path
    iterations: list[int | None]   # None: an input that does not say (order="given")
    weights: list[float]
    seconds: float
    bytes_written: int = 0
    keys: int = 0
    inputs: list[Path] = field(default_factory=list)
    iteration: int | None = None   # the output's


def merge_checkpoints(inputs: Sequence[str | Path], output: str | Path, *, method: str = "sma",
                      alpha: float = 0.2, weights: Sequence[float] | None = None,
                      normalize: bool = False, optimizer: str = "drop", force: bool = False,
                      allow_nonfinite: bool = False, update_tracker: bool | None = None,
                      progress: bool = True, fsync: bool = True,
                      num_files: int | None = None, verify_integrity: bool = False,
                      threads: int | None = None, workers: int = 1, order: str = "iteration",
                      save_dtype: str = "input", output_iteration: int | None = None,
                      allow_extrapolation: bool = False, merge_hf_export: bool = False) -> MergeResult:
    """Average checkpoints of one run into a new checkpoint of the same layout and format.

    Inputs are sorted oldest -> newest by iteration; ``method`` picks the weights (see
    :mod:`megatron_pma.schedules`). ``optimizer``: ``drop`` writes model state only (resume with
    ``--no-load-optim`` / ``--finetune``); ``average`` averages fp32 master params and Adam
    moments; ``keep-last-moments`` averages the fp32 master params and keeps the newest moments.
    The fp32 master params are always merged when kept: they overwrite the model weights on
    resume, so keeping another checkpoint's copy would silently undo the merge.

    ``output`` is published atomically; if its name is ``iter_XXXXXXX`` its parent is treated
    as a save dir whose trackers are written last (``update_tracker=None``: only when that does
    not move the tracker backwards). Raises :class:`PMAError` on bad input, before any output
    exists where the problem is detectable up front. ``verify_integrity`` checks torch_dist inputs
    against their ``integrity.json``; the output gets one whenever that is asked or the newest
    input has one (so Megatron's ``--verify-integrity`` loads it). Under ``torchrun``/``srun`` (or
    an initialised process group) the work is split over ranks; every rank gets the result.
    ``threads``: torch intra-op threads per process for legacy merges (default: the node's cores
    over its processes); the torch_dist path computes with numpy, one thread per process.
    ``workers``: fork this many processes (socketpairs, no launcher, no torch) and split the work
    over them, like torchrun would.

    ``order``: ``iteration`` (default) sorts the inputs by the iteration each was saved at;
    ``given`` takes them as passed (oldest first; weights follow that order), for inputs that do
    not say their iteration or say the same one. ``save_dtype``: ``input`` (default), ``fp32``,
    ``bf16`` or ``fp16`` for the model weights (optimizer state keeps its dtype; extra state and
    fp8 tensors too). ``output_iteration``: the iteration the output says it is (default: the
    number in an ``iter_XXXXXXX`` output name, else the newest input's); when it differs from the
    newest input's, the output's common state (``iteration``, ``args.iteration``; Bridge's
    ``train_state.pt`` step) is rewritten to it. ``allow_extrapolation``: accept custom weights
    that are negative or do not sum to 1 (still finite); recorded in the provenance.
    ``merge_hf_export``: the output's ``hf/`` is the merge of every input's Megatron-Bridge Hugging
    Face export, with the same weights (:mod:`megatron_pma.hf_export`; refused unless every input
    has one, with the same tensors); without it the newest input's ``hf/`` is left out, and the
    provenance says so.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if optimizer not in OPTIMIZER_MODES:
        raise PMAError(f"--optimizer must be one of {', '.join(OPTIMIZER_MODES)}, got {optimizer!r}")
    if workers < 1:
        raise PMAError(f"--workers must be >= 1, got {workers}")
    if save_dtype not in SAVE_DTYPES:
        raise PMAError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    output_iteration = _output_iteration(output, output_iteration)
    try:
        group = Group.forked(workers) if workers > 1 else Group.from_env()
    except RuntimeError as e:
        raise PMAError(str(e)) from None
    try:  # every rank runs the merge; a forked worker process ends in group.close()
        return _merge(inputs, output, group, t0, dict(method=method, alpha=alpha, weights=weights,
                                                      normalize=normalize, optimizer=optimizer, order=order,
                                                      save_dtype=save_dtype, output_iteration=output_iteration,
                                                      allow_extrapolation=allow_extrapolation),
                      force=force, allow_nonfinite=allow_nonfinite, update_tracker=update_tracker,
                      progress=progress and group.rank == 0, fsync=fsync, num_files=num_files,
                      verify_integrity=verify_integrity, threads=threads, merge_hf_export=merge_hf_export)
    finally:
        group.close()


def _output_iteration(output: Path, explicit: int | None) -> int | None:
    """The output's iteration: explicit, else its ``iter_XXXXXXX`` name's (None: the newest input's).
    An explicit one that contradicts the name is refused: the tracker would say the name's."""
    named = iteration_from_name(output) if ITER_DIR.match(output.name) else None
    if explicit is None:
        return named
    if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 0:
        raise PMAError(f"--output-iteration must be a non-negative integer, got {explicit!r}")
    if named is not None and named != explicit:
        raise PMAError(f"{output}: named iteration {named} but --output-iteration {explicit}; "
                       "name the output after the iteration it should say")
    return explicit


def _merge(inputs, output: Path, group: Group, t0: float, schedule: dict, *, force, allow_nonfinite,
           update_tracker, progress, fsync, num_files, verify_integrity, threads, merge_hf_export) -> MergeResult:
    for path in inputs:  # before a format is guessed from a save dir's contents
        layouts.check_is_checkpoint(path)
    fmt = formats.of_inputs(inputs).load()
    plan = fmt.plan(inputs, group, num_files=num_files, verify_integrity=verify_integrity, **schedule)
    layout = plan.newest.layout
    hf = hf_export.plan(plan, group) if merge_hf_export else None  # checked before anything exists
    if plan.warning and group.rank == 0:
        print(plan.warning, file=sys.stderr)
    if group.rank == 0 and output.parent.is_dir():
        publish.remove_stale(output)  # debris of killed merges (their owners' locks are free)
    out.check_output(output, plan, force, update_tracker)
    sub = Path(layout.data_subdir)  # where the format's files go inside the output (NeMo 2: weights/)
    staging = out.open_staging(output, group, ([sub] if sub.parts else []) + [sub / d for d in fmt.staging_dirs(plan)]
                               + ([sub / d for d in hf_export.staging_dirs(hf)] if hf else []))
    data = staging.path / sub
    error, mine, hf_mine = None, (), ()
    try:
        how = dict(allow_nonfinite=allow_nonfinite, fsync=fsync,
                   progress=lambda total: out.make_progress(progress, total),
                   threads=threads or max(1, (os.cpu_count() or 1) // max(1, out.local_world(group))))
        mine = fmt.write(plan, data, group, **how)
        if hf:  # split over the ranks like the main merge
            hf_mine = hf_export.write(hf, data, group, **how)
    except PMAError as e:
        error = str(e)
    except Exception as e:  # keep ranks in step: report, then fail everywhere
        error = f"rank {group.rank}: {type(e).__name__}: {e}"
    error = group.first_error(error)
    gathered = [group.gather_dicts(d) for d in mine] if not error else []
    hf_gathered = [group.gather_dicts(d) for d in hf_mine] if not error else []
    if group.rank == 0:
        try:
            if error is None:
                skip = layout.left_out(plan.newest.outer)  # the format copies none of these from the newest
                layout.copy_beside(plan.newest.outer, staging.path)
                extra = fmt.fields(plan, *gathered)
                left_out = {k: v for k, v in skip.items() if not (hf and k == hf.subdir)}
                if hf:
                    extra["hf"] = hf_export.describe(hf)
                if left_out:  # recorded: nobody should wonder where the newest input's hf/ went
                    extra["left_out"] = left_out
                extra.update(order=schedule["order"], save_dtype=schedule["save_dtype"],
                             allow_extrapolation=schedule["allow_extrapolation"])
                publish.write_json(staging.path / PROVENANCE_FILE,
                                   out.provenance(plan, schedule["alpha"], output, group.world,
                                                  time.perf_counter() - t0, **extra))
                fmt.finish(plan, data, *gathered, left_out=skip)
                if hf:
                    hf_export.finish(hf, data, *hf_gathered)
                if plan.restamped:
                    layout.stamp_iteration(staging.path, plan.iteration)
                publish.publish(staging, output, replace=force, fsync=fsync)
                out.update_trackers(layout, output, plan.iteration, update_tracker, fsync)
        except PMAError as e:
            error = str(e)
        except OSError as e:
            error = f"{output}: cannot publish ({e.strerror or e})"
        finally:
            staging.release()  # after a publish only the lock is left to remove
    error = group.first_error(error)
    if error:
        raise PMAError(error)
    nbytes, keys = fmt.summary(plan, output, *gathered)
    if hf:
        nbytes += hf_export.bytes_written(hf, output, *hf_gathered)
    return MergeResult(output, [c.iteration for c in plan.inputs], plan.weights, time.perf_counter() - t0,
                       nbytes, keys, [c.outer for c in plan.inputs], plan.iteration)
