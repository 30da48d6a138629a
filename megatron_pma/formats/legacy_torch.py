"""Merging legacy ``--ckpt-format torch`` checkpoints (``mp_rank_*/model_optim_rng.pt``), file by file.

Each ``mp_rank_*`` file of the output is the newest input's file with its floating tensors replaced
by the weighted average of the same tensor in every input (fp32 accumulation, written back in the
tensor's dtype); everything else (``args``, rng state, scheduler, counters) is the newest input's,
byte for byte. All inputs' files are memory-mapped (read-only use, so no input is ever modified);
each average goes to a new buffer that the newest input's tensor is re-pointed to, so a process
holds one file's merged tensors at most. ``torch_pickle`` reads and writes the pickled objects
without importing megatron.

Optimizer state: ``drop`` removes ``optimizer`` (and ``distrib_optim.pt``); resume with
``--no-load-optim`` or ``--finetune``. Whenever the optimizer is kept its fp32 main params
(``fp32_from_fp16_params`` of the Float16 optimizer, ``param`` in ``distrib_optim.pt``) are
averaged too: on resume they overwrite the model weights, so another checkpoint's copy would undo
the merge. ``average`` also averages the moments; ``keep-last-moments`` keeps the newest ones.
Step counters and loss scales are always the newest's. Under torchrun / srun the files are spread
over ranks (rank r takes files r, r+P, ...); each file is written whole by one process, so the
output does not depend on the number of processes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from megatron_pma import input_order, layouts, schedules
from megatron_pma.checkpoint import iteration_stamp, legacy, publish, safe_pickle, torch_pickle
from megatron_pma.checkpoint.discovery import check_checkpoint_dir
from megatron_pma.errors import PMAError, UnknownIteration
from megatron_pma.names import PROVENANCE_FILE, SAVE_DTYPES, is_extra_state

NAME = "torch"
MODEL_KEY = re.compile(r"^model\d*$")  # model, or model0, model1, ... (virtual pipeline chunks)
FORMAT = "torch (legacy --ckpt-format torch)"
_MAIN_PARAMS = {"fp32_from_fp16_params", "fp32_from_fp16"}  # Float16 optimizer (newer, older name)
_MOMENTS = {"exp_avg", "exp_avg_sq"}
_COUNTERS = {"step", "scale", "growth_tracker", "hysteresis_tracker"}  # never averaged
_CONVERTIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # --save-dtype converts these


@dataclass
class LegacyInput:
    path: Path
    iteration: int | None  # None: unknown (only with order="given")
    layout: layouts.Layout = layouts.LAYOUTS[-1]

    @property
    def outer(self) -> Path:
        return self.path

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass
class LegacyPlan:
    inputs: list[LegacyInput]
    weights: list[float]
    files: list[str]               # merged files, relative: mp_rank_00/model_optim_rng.pt, ...
    copies: list[str] = field(default_factory=list)  # other files, copied from the newest input
    method: str = "sma"
    optimizer: str = "drop"
    iteration: int | None = None          # the output's (written into every rank file when it differs)
    save_dtype: torch.dtype | None = None  # model weights written in this dtype (None: their own)
    warning: str | None = None            # one line for the user (weights vs. inputs typed out of order)

    @property
    def newest(self) -> LegacyInput:
        return self.inputs[-1]

    @property
    def restamped(self) -> bool:
        """The output's iteration differs from the newest input's: rank files get the new one."""
        return self.iteration is not None and self.iteration != self.newest.iteration


# ---------------------------------------------------------------------------------------------
# Which tensors are averaged


def tensor_role(path: tuple) -> str:
    """"model", "param" (fp32 main params), "moment", "counter", "extra" (Transformer Engine's
    extra state, as a tensor) or "other" (optimizer state)."""
    if any(isinstance(p, str) and is_extra_state(p) for p in path):
        return "extra"
    if path and isinstance(path[0], str) and MODEL_KEY.match(path[0]):
        return "model"
    if _MAIN_PARAMS & {p for p in path if isinstance(p, str)} or path[-1] == "param":
        return "param"
    if path[-1] in _COUNTERS:
        return "counter"
    return "moment" if path[-1] in _MOMENTS else "other"


def _averaged(role: str, optimizer: str, dtype: torch.dtype) -> bool:
    if not dtype.is_floating_point or role in ("counter", "extra"):
        return False
    return role in ("model", "param") or optimizer == "average"


def _subtrees(obj, dist_file: bool, optimizer: str) -> list:
    """Top-level keys whose tensors must match across inputs (and may be averaged)."""
    if dist_file:
        return list(obj)
    keep_optim = optimizer != "drop"
    return [k for k in obj if isinstance(k, str) and (MODEL_KEY.match(k) or (keep_optim and k == "optimizer"))]


def show(path: tuple) -> str:
    return "/".join(map(str, path))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


def walk(nodes: list, path: tuple, files: list[str]) -> Iterator[tuple[tuple, list[torch.Tensor]]]:
    """(path, [tensor of every input]) for each tensor under ``nodes`` (one node per input, the
    newest last), checking that every input has the same structure, shapes and dtypes."""
    ref = nodes[-1]
    for other, f in zip(nodes[:-1], files):
        _compare(other, ref, path, f, files[-1])
    if isinstance(ref, torch.Tensor):
        yield path, nodes
    elif isinstance(ref, dict):
        for key in ref:
            yield from walk([n[key] for n in nodes], path + (key,), files)
    elif isinstance(ref, (list, tuple)):
        for i in range(len(ref)):
            yield from walk([n[i] for n in nodes], path + (i,), files)


def _compare(x, ref, path: tuple, file: str, ref_file: str) -> None:
    where = f"key {show(path) or '(top)'}"
    if isinstance(ref, torch.Tensor) or isinstance(x, torch.Tensor):
        if not (isinstance(ref, torch.Tensor) and isinstance(x, torch.Tensor)):
            raise PMAError(f"{file}: {where} is {_describe(x)}, {ref_file} has {_describe(ref)}")
        if x.shape != ref.shape:
            raise PMAError(f"{file}: {where} has shape {list(x.shape)}, {ref_file} has {list(ref.shape)}")
        if x.dtype != ref.dtype:
            raise PMAError(f"{file}: {where} has dtype {x.dtype}, {ref_file} has {ref.dtype}")
        if _layout(x) != _layout(ref):
            raise PMAError(f"{file}: {where} is stored differently (storage offset/size/strides) than in {ref_file}")
    elif isinstance(ref, dict):
        if not isinstance(x, dict):
            raise PMAError(f"{file}: {where} is {_describe(x)}, {ref_file} has a dict")
        missing, extra = [k for k in ref if k not in x], [k for k in x if k not in ref]
        if missing:
            raise PMAError(f"{file}: missing key {show(path + (missing[0],))} (present in {ref_file})")
        if extra:
            raise PMAError(f"{file}: key {show(path + (extra[0],))} is not in {ref_file}")
    elif isinstance(ref, (list, tuple)):
        if not isinstance(x, (list, tuple)) or len(x) != len(ref):
            n = len(x) if isinstance(x, (list, tuple)) else _describe(x)
            raise PMAError(f"{file}: {where} has {n} entries, {ref_file} has {len(ref)}")


def _layout(t: torch.Tensor) -> tuple:
    return t.storage_offset(), t.stride(), t.untyped_storage().nbytes()


def tensors_to_merge(objs: list, dist_file: bool, optimizer: str, files: list[str]):
    """(path, role, tensors) of every tensor of the kept subtrees; structure checked on the way."""
    ref = objs[-1]
    if not isinstance(ref, dict):
        raise PMAError(f"{files[-1]}: not a Megatron checkpoint file (top level is {_describe(ref)})")
    for other, f in zip(objs[:-1], files):
        if not isinstance(other, dict):
            raise PMAError(f"{f}: not a Megatron checkpoint file (top level is {_describe(other)})")
    for key in _subtrees(ref, dist_file, optimizer):
        for other, f in zip(objs[:-1], files):
            if key not in other:
                raise PMAError(f"{f}: missing key {key} (present in {files[-1]})")
        for path, tensors in walk([o[key] for o in objs], (key,), files):
            yield path, tensor_role(path), tensors
    if not dist_file:
        for other, f in zip(objs[:-1], files):  # a model chunk only the older input has
            extra = [k for k in _subtrees(other, False, optimizer) if k not in ref]
            if extra:
                raise PMAError(f"{f}: key {extra[0]} is not in {files[-1]}")


# ---------------------------------------------------------------------------------------------
# Planning: every check that can fail runs here, before any output exists.


def load_input(path: Path, a_legacy_input: Path | None = None, unknown_iteration: bool = False) -> LegacyInput:
    """One input; ``unknown_iteration``: one that does not say its iteration loads with None."""
    path = Path(path)
    check_checkpoint_dir(path)
    if not legacy.is_legacy_checkpoint(path):
        raise PMAError(f"{path}: mixed checkpoint formats: not a legacy --ckpt-format torch checkpoint, "
                       f"but {a_legacy_input} is; merge checkpoints of one format")
    safe_pickle.check_tree(path)  # every pickle read or copied verbatim passes the allowlist
    layout = layouts.of_checkpoint(path)
    try:
        iteration = layout.iteration(path, lambda: _read_state(path))
    except UnknownIteration:
        if not unknown_iteration:
            raise
        iteration = None
    return LegacyInput(path, iteration, layout)


def _read_state(path: Path) -> dict | None:
    file = legacy.rank_dirs(path)[0] / legacy.MODEL_FILE
    _check_file(file)
    try:
        return legacy.read_state(path)
    except PMAError:
        raise
    except Exception as e:
        raise PMAError(f"{file}: unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _check_file(file: Path) -> None:
    if not file.is_file():
        raise PMAError(f"{file}: missing (incomplete save?)")
    if not os.access(file, os.R_OK):
        raise PMAError(f"{file}: permission denied")
    if not legacy.finished(file):
        raise PMAError(f"{file}: truncated (no zip end record: an unfinished or damaged save)")


def _layout_files(inputs: list[LegacyInput], optimizer: str) -> tuple[list[str], list[str]]:
    """Files to merge and files to copy (from the newest), after checking all inputs hold them."""
    newest = inputs[-1]
    names = [d.name for d in legacy.rank_dirs(newest.path)]
    for c in inputs[:-1]:
        mine = [d.name for d in legacy.rank_dirs(c.path)]
        if set(names) - set(mine):
            raise PMAError(f"{c.label}: has no {min(set(names) - set(mine))} (present in {newest.label}); "
                           "merge checkpoints saved with the same parallel layout")
        if set(mine) - set(names):
            raise PMAError(f"{c.label}: {min(set(mine) - set(names))} is not in {newest.label}; "
                           "merge checkpoints saved with the same parallel layout")
    merged, copies = [], []
    for name in names:
        merged.append(f"{name}/{legacy.MODEL_FILE}")
        for entry in sorted(os.scandir(newest.path / name), key=lambda e: e.name):
            rel = f"{name}/{entry.name}"
            if entry.name == legacy.MODEL_FILE or (entry.name == legacy.DIST_OPTIM_FILE and optimizer == "drop"):
                continue
            if entry.name == legacy.DIST_OPTIM_FILE:
                merged.append(rel)
            elif "optim" in entry.name:  # other optimizer state (layer-wise optimizer, ...)
                if optimizer != "drop":
                    raise PMAError(f"{newest.path / rel}: optimizer state in a format we cannot merge; "
                                   "use --optimizer drop")
            else:
                copies.append(rel)
    for c in inputs:
        for rel in merged:
            if rel.endswith(legacy.DIST_OPTIM_FILE) and not (c.path / rel).exists():
                raise PMAError(f"{c.path / rel}: missing, but {newest.label} has one (saved with another "
                               "optimizer? --optimizer drop merges the model only)")
            _check_file(c.path / rel)
    return merged, copies


def _check_rank_set(plan: LegacyPlan) -> None:
    """The newest input's args name the rank dirs a complete save has."""
    state = _read_state(plan.newest.path)
    expected = legacy.expected_rank_dirs(state.get("args")) if state else None
    have = [d.name for d in legacy.rank_dirs(plan.newest.path)]
    if expected is not None and expected != have:
        missing = sorted(set(expected) - set(have))
        what = f"has no {missing[0]}" if missing else f"has {sorted(set(have) - set(expected))[0]}"
        raise PMAError(f"{plan.newest.label}: {what}, but its args say TP/PP/EP make {len(expected)} "
                       "mp_rank dirs (incomplete save?)")


def check_file(plan: LegacyPlan, rel: str) -> None:
    """Load one file of every input (pickles only: tensors stay mapped) and compare them."""
    files = [str(c.path / rel) for c in plan.inputs]
    objs = [_load(Path(f))[0] for f in files]
    for _ in tensors_to_merge(objs, rel.endswith(legacy.DIST_OPTIM_FILE), plan.optimizer, files):
        pass


def _load(file: Path):
    try:
        return torch_pickle.load(file)
    except PMAError:
        raise
    except PermissionError:
        raise PMAError(f"{file}: permission denied") from None
    except Exception as e:
        raise PMAError(f"{file}: unreadable ({type(e).__name__}: {_first_line(e)})") from None


def plan_legacy(inputs: Sequence[str | Path], group, *, method: str = "sma", alpha: float = 0.2,
                weights: Sequence[float] | None = None, normalize: bool = False,
                optimizer: str = "drop", order: str = "iteration", save_dtype: str = "input",
                output_iteration: int | None = None, allow_extrapolation: bool = False) -> LegacyPlan:
    paths = [Path(p) for p in inputs]
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise PMAError(f"{p}: the same checkpoint is given twice")
        seen[p.resolve()] = p
    first = next(p for p in paths if legacy.is_legacy_checkpoint(p))
    input_order.check_order(order)
    if save_dtype not in SAVE_DTYPES:
        raise PMAError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    typed = [load_input(p, first, unknown_iteration=order == "given") for p in paths]
    loaded = input_order.ordered(typed, order)
    layouts.check_same(loaded)
    w = schedules.weights(method, len(loaded), alpha=alpha, values=weights, normalize=normalize,
                          positions=input_order.positions(loaded),  # WSM samples its decay at these
                          allow_extrapolation=allow_extrapolation)
    files, copies = _layout_files(loaded, optimizer)
    target = getattr(torch, SAVE_DTYPES[save_dtype]) if SAVE_DTYPES[save_dtype] else None
    plan = LegacyPlan(loaded, w, files, copies, method, optimizer,
                      output_iteration if output_iteration is not None else loaded[-1].iteration, target,
                      input_order.weights_warning(typed, loaded, w, order) if weights is not None else None)
    _check_rank_set(plan)
    error = None
    try:  # the expensive part (every file's pickle), spread over ranks like the merge itself
        for rel in files[group.rank::group.world]:
            check_file(plan, rel)
    except PMAError as e:
        error = str(e)
    error = group.first_error(error)
    if error:
        raise PMAError(error)
    return plan


# ---------------------------------------------------------------------------------------------
# Execution


SLAB_ELEMENTS = 1 << 24  # fp32 accumulator per slab: 64 MiB


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The whole storage of ``t`` as a 1-D tensor of its dtype (views of one storage merge once)."""
    s = t.untyped_storage()
    return torch.empty(0, dtype=t.dtype).set_(s, 0, (s.nbytes() // t.element_size(),))


class _Scratch:
    """One reusable fp32 accumulator (a fresh big allocation costs a page fault per 4 KiB)."""

    def __init__(self):
        self._buf = torch.empty(0)

    def get(self, n: int) -> torch.Tensor:
        if self._buf.numel() < n:
            self._buf = torch.empty(n)
        return self._buf[:n]


def _average(tensors: list[torch.Tensor], weights: list[float], check: bool, label,
             scratch: _Scratch, dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i * storage_i as a new flat tensor of ``dtype``, slab by slab in fp32.

    A new buffer, not the newest input's mapped pages: writing those would copy each page first.
    """
    srcs = [_flat(t) for t in tensors]
    out = torch.empty(srcs[-1].numel(), dtype=dtype)
    fp32 = out.dtype == torch.float32
    for first in range(0, out.numel(), SLAB_ELEMENTS):
        n = min(SLAB_ELEMENTS, out.numel() - first)
        if fp32 and srcs[0].dtype == torch.float32:  # accumulate in the output itself
            acc = torch.mul(srcs[0][first:first + n], weights[0], out=out[first:first + n])
        elif fp32:  # --save-dtype fp32 of narrower inputs: widen first, then weigh (no rounding)
            acc = out[first:first + n].copy_(srcs[0][first:first + n]).mul_(weights[0])
        else:
            acc = scratch.get(n).copy_(srcs[0][first:first + n]).mul_(weights[0])
        for w, s in zip(weights[1:], srcs[1:]):
            acc.add_(s[first:first + n], alpha=w)
        if check and not math.isfinite(float(acc.sum())) and not bool(torch.isfinite(acc).all()):
            raise PMAError(_nonfinite(srcs, first, n, label))
        if not fp32:
            out[first:first + n].copy_(acc)
    return out


def _nonfinite(srcs, first, n, label) -> str:
    files, path = label
    for s, f in zip(srcs, files):
        if not bool(torch.isfinite(s[first:first + n]).all()):
            return f"{f}: key {show(path)} holds NaN/Inf (pass --allow-nonfinite to merge anyway)"
    return f"{files[-1]}: key {show(path)}: merged values overflow to Inf"


def merge_file(plan: LegacyPlan, rel: str, stage: Path, allow_nonfinite: bool) -> int:
    """Write the merged ``rel`` into ``stage``; returns the number of tensors averaged."""
    files = [str(c.path / rel) for c in plan.inputs]
    loaded = [_load(Path(f)) for f in files]
    objs, codec = [o for o, _ in loaded], loaded[-1][1]
    dist_file = rel.endswith(legacy.DIST_OPTIM_FILE)
    merged: dict[int, torch.Tensor] = {}  # newest's storage -> its average (views share it)
    averages: set[int] = set()  # storages of the averages (a tensor met twice is done)
    scratch = _Scratch()
    with torch.no_grad():
        for path, role, tensors in tensors_to_merge(objs, dist_file, plan.optimizer, files):
            t = tensors[-1]
            key = t.untyped_storage().data_ptr()
            average = (len(tensors) > 1 or plan.weights != [1.0]) and _averaged(role, plan.optimizer, t.dtype)
            convert = _converted(role, t.dtype, plan.save_dtype)
            if key in averages or not (average or convert):
                continue
            if key not in merged:
                merged[key] = _average(tensors if average else tensors[-1:], plan.weights if average else [1.0],
                                       not allow_nonfinite, (files, path), scratch, convert or t.dtype)
                averages.add(merged[key].untyped_storage().data_ptr())
            m = merged[key]
            if m.dtype == t.dtype:
                t.set_(m.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            else:  # --save-dtype: a tensor of the new dtype, the same view of the converted storage
                _replace(objs[-1], path, torch.empty(0, dtype=m.dtype).set_(
                    m.untyped_storage(), t.storage_offset(), t.size(), t.stride()))
    newest = objs[-1]
    if plan.optimizer == "drop" and not dist_file:
        newest.pop("optimizer", None)
    if plan.restamped and not dist_file:
        iteration_stamp.stamp_state(newest, plan.iteration)
    out = stage / rel
    try:
        codec.save(newest, out)
    except OSError as e:
        raise PMAError(f"{out}: write failed ({os.strerror(e.errno) if e.errno else e})") from None
    except RuntimeError as e:  # torch's zip writer hides the OSError
        raise PMAError(f"{out}: write failed ({_first_line(e)})") from None
    if plan.optimizer != "drop" and not plan.restamped and plan.save_dtype is None:  # nothing changed on purpose
        _check_faithful(Path(files[-1]), out)
    return len(merged)


def _converted(role: str, dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype | None:
    """``--save-dtype``'s dtype for a model weight that changes (None: it keeps its own)."""
    if target is None or role != "model" or dtype == target or dtype not in _CONVERTIBLE:
        return None
    return target


def _replace(obj, path: tuple, value) -> None:
    """Put ``value`` at ``path`` inside the loaded object (a tensor that changes dtype)."""
    for key in path[:-1]:
        obj = obj[key]
    if isinstance(obj, tuple):
        raise PMAError(f"key {show(path)}: inside a tuple, cannot change its dtype")
    obj[path[-1]] = value


def _pickle_record(file: Path) -> bytes:
    with zipfile.ZipFile(file) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def _check_faithful(src: Path, out: Path) -> None:
    """Only tensor values may differ from the newest input: its pickle must come back unchanged."""
    if _pickle_record(src) != _pickle_record(out):
        raise PMAError(f"{src}: re-saving it changed its pickled objects; refusing to write a "
                       "checkpoint Megatron might read differently (please report)")


def _copy_rest(plan: LegacyPlan, stage: Path, left_out: set[str]) -> None:
    """Non-merged files of the newest input: top-level ones and extras inside rank dirs."""
    newest = plan.newest.path
    for entry in os.scandir(newest):
        if (legacy.RANK_DIR.match(entry.name) or entry.name == PROVENANCE_FILE or entry.name in left_out
                or entry.name.startswith(".")):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, stage / entry.name, symlinks=True)
        else:
            shutil.copy2(entry.path, stage / entry.name, follow_symlinks=False)
    for rel in plan.copies:
        shutil.copy2(newest / rel, stage / rel, follow_symlinks=False)


def plan(inputs: Sequence[str | Path], group, *, num_files: int | None = None,
         verify_integrity: bool = False, **schedule) -> LegacyPlan:
    """The format protocol's planner. ``num_files`` and ``verify_integrity`` do not apply: the file
    layout is Megatron's, and it has no integrity manifest."""
    return plan_legacy(inputs, group, **schedule)


def staging_dirs(plan: LegacyPlan) -> list[Path]:
    """The ``mp_rank_*`` folders, created before ranks write into them."""
    return [Path(name) for name in sorted({rel.split("/")[0] for rel in plan.files})]


def write(plan: LegacyPlan, stage: Path, group, *, allow_nonfinite: bool, progress, fsync: bool,
          threads: int) -> tuple[dict]:
    """This rank's share of the files (r, r+P, ...): ({file: tensors averaged},)."""
    mine = plan.files[group.rank::group.world]
    sizes = {rel: (plan.newest.path / rel).stat().st_size for rel in mine}
    update, close_bar = progress(sum(sizes.values()))
    counts = {}
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for rel in mine:
            counts[rel] = merge_file(plan, rel, stage, allow_nonfinite)
            if fsync:  # each rank syncs its own files, in parallel
                publish.fsync_path(stage / rel)
            update(sizes[rel])
    finally:
        close_bar()
        torch.set_num_threads(saved)  # callers (a training process) keep their setting
    return (counts,)


def fields(plan: LegacyPlan, counts: dict) -> dict:
    """What this format adds to pma_provenance.json."""
    return dict(format=FORMAT, files=len(plan.files), tensors_averaged=sum(counts.values()))


def finish(plan: LegacyPlan, stage: Path, counts: dict, left_out: dict) -> None:
    """Rank 0, after every rank wrote: the newest input's other files."""
    _copy_rest(plan, stage, set(left_out))


def summary(plan: LegacyPlan, output: Path, counts: dict) -> tuple[int, int]:
    """(bytes of the merged files, tensors averaged) for the result."""
    return sum((output / rel).stat().st_size for rel in plan.files), sum(counts.values())


# ---------------------------------------------------------------------------------------------
# inspect


def describe(path: Path) -> dict:
    """What ``megatron-pma inspect`` shows for a legacy checkpoint (same fields as torch_dist)."""
    from megatron_pma.checkpoint.common_state import consumed_tokens

    path = Path(path)
    ckpt = load_input(path, path)
    keys, total, roles, nfiles = [], 0, set(), 0
    state = None
    for d in legacy.rank_dirs(path):
        for name in (legacy.MODEL_FILE, legacy.DIST_OPTIM_FILE):
            file = d / name
            if not file.is_file():
                continue
            _check_file(file)
            obj, _ = _load(file)
            nfiles += 1
            if state is None and name == legacy.MODEL_FILE:
                state = obj
            dist_file = name == legacy.DIST_OPTIM_FILE
            for p, role, ts in tensors_to_merge([obj], dist_file, "average", [str(file)]):
                t = ts[-1]
                total += t.numel() * t.element_size()
                roles.add(role)
                keys.append({"key": f"{d.name}:{show(p)}", "shape": list(t.shape),
                             "dtype": str(t.dtype).replace("torch.", ""), "chunks": 1, "role": role})
    args = state.get("args") if isinstance(state, dict) else None
    dirs = legacy.rank_dirs(path)
    return {
        "path": str(path),
        "format": f"{FORMAT}, {len(dirs)} mp_rank dirs",
        "metadata_json": None,
        "iteration": ckpt.iteration,
        "tokens": consumed_tokens(state if isinstance(state, dict) else None, ckpt.iteration),
        "parallel": {k: getattr(args, k, None) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                         "expert_model_parallel_size", "data_parallel_size")} if args else None,
        "optimizer_state": sorted(roles & {"param", "moment", "other"}) or "none",
        "tensor_bytes": total,
        "files": nfiles,
        "keys": keys,
    }
