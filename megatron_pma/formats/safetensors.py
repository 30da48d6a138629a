"""The ``safetensors`` format (Hugging Face ``save_pretrained``, NeMo Automodel's checkpointer):
plan, then a streamed weighted sum written as safetensors files.

Every ``.safetensors`` file of the newest input becomes a file of the output with the same name,
the same header bytes (``__metadata__`` included) and the same tensors at the same offsets:
merging keeps every dtype and shape, so the newest's header already says where each tensor goes
(older inputs may order their tensors or size their headers differently: each is read where it is),
and any process can write any tensor with ``pwrite`` (output files are split over ranks by
tensor, and 1 or P processes write the same bytes). Indexes (``*.safetensors.index.json``) and
the other files beside the tensors are the newest's. Floating tensors are accumulated in fp32
(fp64 for fp64) slab by slab and written in their own dtype; other tensors are the newest's
bytes. Inputs are matched file by file and, inside a file, tensor by tensor: a run saves the same
files each time. numpy does the arithmetic; torch is never imported; memory is a few slabs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_pma import input_order, layouts, schedules, slab_math
from megatron_pma.checkpoint import dcp, safe_pickle, safetensors_file as stf, writeback
from megatron_pma.checkpoint.discovery import check_checkpoint_dir
from megatron_pma.checkpoint.dcp_types import DType
from megatron_pma.errors import PMAError, UnknownIteration
from megatron_pma.formats import dcp_optimizer, torch_dist
from megatron_pma.formats.torch_dist import SLAB_ELEMENTS
from megatron_pma.names import PROVENANCE_FILE, SAVE_DTYPES, is_extra_state

NAME = "safetensors"


def detect(path: Path) -> bool:
    """The checkpoint's tensor folder (its layout's data dir) holds safetensors."""
    try:
        layout = layouts.of_checkpoint(Path(path))
        return stf.holds_safetensors(layout.data_dir(layout.root(Path(path))))
    except (PMAError, OSError):
        return False


@dataclass
class Input:
    path: Path                # the folder holding the .safetensors files
    iteration: int | None     # None: unknown (only with order="given")
    checkpoint: stf.Checkpoint
    root: Path                # the checkpoint dir (a NeMo-RL step_N), or ``path``
    layout: layouts.Layout

    @property
    def outer(self) -> Path:
        return self.root

    @property
    def label(self) -> str:
        return str(self.root)


@dataclass
class Job:
    """One byte range of an output file: a merged tensor, a copied tensor, or the header."""

    file: str                 # relative name
    name: str | None          # tensor name; None for the header
    offset: int               # where it goes in the output file
    nbytes: int               # output bytes
    dtype: DType | None = None
    merge: bool = False
    src: int = 0              # where it is in the newest input's file
    out_dtype: DType | None = None   # --save-dtype: written as this (None: as dtype)
    payload: bytes | None = None     # a rewritten header (--save-dtype), written instead of the newest's


@dataclass
class Plan:
    inputs: list[Input]
    weights: list[float]
    jobs: list[Job]
    method: str
    optimizer: str
    sizes: dict[str, int]          # output file sizes
    tensors: int = 0
    merged: int = 0
    optim: torch_dist.MergePlan | None = None   # --optimizer average of a DCP optimizer beside the weights
    iteration: int | None = None   # the output's
    warning: str | None = None     # one line for the user (weights vs. inputs typed out of order)

    @property
    def newest(self) -> Input:
        return self.inputs[-1]

    @property
    def restamped(self) -> bool:
        return self.iteration is not None and self.iteration != self.newest.iteration

    @property
    def retyped(self) -> bool:
        """--save-dtype changed some tensor: headers and index sizes are rewritten."""
        return any(j.out_dtype is not None for j in self.jobs)


# ---------------------------------------------------------------------------------------------
# Planning: every check that can fail runs here, before any output exists.


def load_input(path: Path, unknown_iteration: bool = False) -> Input:
    """One input, checked; ``unknown_iteration``: a folder that does not say its step loads with
    iteration None instead of being refused (``order="given"``)."""
    path = Path(path)
    check_checkpoint_dir(path)
    layout = layouts.of_checkpoint(path)
    root = layout.root(path)
    data = layout.data_dir(root)
    if not stf.holds_safetensors(data):
        raise PMAError(f"{path}: mixed checkpoint formats: no {stf.SUFFIX} files in {data}; merge "
                       "checkpoints of one format")
    ckpt = stf.read_checkpoint(data)
    # pickles beside the weights (a Trainer's training_args.bin, NeMo-RL's train_dataloader.pt) are
    # copied from the newest input: they pass the allowlist first; DCP optimizer folders are read
    # through their metadata (dcp_optimizer.plan)
    safe_pickle.check_tree(root, skip=lambda p: p.suffix in (stf.SUFFIX, ".distcp") or p.name == dcp.METADATA_FILE)
    try:
        iteration = layout.iteration(root, lambda: None)
    except UnknownIteration:
        if not unknown_iteration:
            raise
        iteration = None
    return Input(data, iteration, ckpt, root, layout)


def check_same(inputs: Sequence[Input]) -> None:
    """Same files, and in each the same tensor names, dtypes and shapes (the first difference named)."""
    ref = inputs[-1]
    for other in inputs[:-1]:
        a, b = set(other.checkpoint.files), set(ref.checkpoint.files)
        if b - a:
            raise PMAError(f"{other.label}: has no {min(b - a)} (present in {ref.label}); merge checkpoints "
                           "of one run, saved the same way")
        if a - b:
            raise PMAError(f"{other.label}: {min(a - b)} is not in {ref.label}; merge checkpoints of one run, "
                           "saved the same way")
        for rel, rf in ref.checkpoint.files.items():
            of = other.checkpoint.files[rel]
            missing, extra = sorted(set(rf.tensors) - set(of.tensors)), sorted(set(of.tensors) - set(rf.tensors))
            if missing:
                raise PMAError(f"{of.path}: missing key {missing[0]} (present in {rf.path})")
            if extra:
                raise PMAError(f"{of.path}: key {extra[0]} is not in {rf.path}")
            for name, t in rf.tensors.items():
                o = of.tensors[name]
                if o.shape != t.shape:
                    raise PMAError(f"{of.path}: key {name} has shape {list(o.shape)}, {rf.path} has {list(t.shape)}")
                if o.dtype is not t.dtype:
                    raise PMAError(f"{of.path}: key {name} has dtype {o.dtype.name}, {rf.path} has {t.dtype.name}")


def plan(inputs: Sequence[str | Path], group, *, method: str = "sma", alpha: float = 0.2,
         weights: Sequence[float] | None = None, normalize: bool = False, optimizer: str = "drop",
         num_files: int | None = None, verify_integrity: bool = False, order: str = "iteration",
         save_dtype: str = "input", output_iteration: int | None = None,
         allow_extrapolation: bool = False) -> Plan:
    """The format protocol's planner. ``num_files`` and ``verify_integrity`` do not apply: the
    files are the newest input's, and safetensors checkpoints have no integrity manifest. The
    output's iteration is only recorded: a safetensors folder holds none to rewrite."""
    if not inputs:
        raise PMAError("no input checkpoints given")
    paths = [Path(p) for p in inputs]
    seen: dict[Path, Path] = {}
    for p in paths:
        check_checkpoint_dir(p)
        real = layouts.of_checkpoint(p).root(p).resolve()
        if real in seen:
            raise PMAError(f"{p}: the same checkpoint is given twice")
        seen[real] = p
    # layouts first: steps of two NeMo-RL backends read as "different backends", not "no files"
    layouts.check_same([_Labelled(layouts.of_checkpoint(p), str(p)) for p in paths])
    input_order.check_order(order)
    if save_dtype not in SAVE_DTYPES:
        raise PMAError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    target = DType.get(SAVE_DTYPES[save_dtype]) if SAVE_DTYPES[save_dtype] else None
    typed = [load_input(p, unknown_iteration=order == "given") for p in paths]
    loaded = input_order.ordered(typed, order)
    newest = loaded[-1]
    _check_optimizer(newest, optimizer)
    w = schedules.weights(method, len(loaded), alpha=alpha, values=weights, normalize=normalize,
                          positions=input_order.positions(loaded),  # WSM samples its decay at these
                          allow_extrapolation=allow_extrapolation)
    warning = input_order.weights_warning(typed, loaded, w, order) if weights is not None else None
    check_same(loaded)
    optim_rel = newest.layout.optimizer_subdir
    optim = dcp_optimizer.plan(loaded, w, optim_rel, method) if optimizer == "average" else None
    jobs, sizes, n_tensors, n_merged = [], {}, 0, 0
    for rel, f in newest.checkpoint.files.items():
        retype = {name: target for name, t in f.tensors.items() if _retyped(name, t.dtype, target)}
        header, offsets, sizes[rel] = (stf.with_dtypes(f, retype) if retype else
                                       (None, {n: t.offset for n, t in f.tensors.items()}, f.size))
        jobs.append(Job(rel, None, 0, len(header) if header else f.header_bytes, payload=header))
        for name, t in f.tensors.items():
            extra = is_extra_state(name)  # Transformer Engine's FP8 scales: the newest's
            merge = t.dtype.is_floating_point and len(loaded) > 1 and not extra
            if merge and not slab_math.supported(t.dtype):
                raise PMAError(f"{f.path}: key {name} is {t.dtype.name}; averaging {t.dtype.name} values "
                               "(each checkpoint scaled its own way) is not supported")
            out_dtype = retype.get(name)
            jobs.append(Job(rel, name, offsets[name], t.numel * (out_dtype or t.dtype).itemsize, t.dtype,
                            merge or out_dtype is not None, t.offset, out_dtype))
            n_tensors += 1
            n_merged += merge
    return Plan(loaded, w, jobs, method, optimizer, sizes, n_tensors, n_merged, optim,
                output_iteration if output_iteration is not None else newest.iteration, warning)


def _retyped(name: str, dtype: DType, target: DType | None) -> bool:
    """--save-dtype applies to floating weights (not to fp8, integers or extra state)."""
    return target is not None and dtype is not target and slab_math.supported(dtype) and not is_extra_state(name)


def _check_optimizer(newest: Input, optimizer: str) -> None:
    """What can be done with the optimizer state beside safetensors weights: NeMo-RL's DTensor
    backend keeps it in policy/optimizer/ (a torch DCP of Adam moments and steps, no fp32 copy
    of the weights): ``average`` averages the moments (:mod:`dcp_optimizer`),
    ``keep-last-moments`` keeps the newest's, ``drop`` leaves it out. A Hugging Face Trainer's
    optimizer.pt is never merged."""
    rel = newest.layout.optimizer_subdir
    if optimizer == "drop":
        return
    if rel is None:
        raise PMAError(f"{newest.label}: --optimizer {optimizer}: the optimizer state beside safetensors weights "
                       "(a Hugging Face Trainer's optimizer.pt) is not merged; use --optimizer drop")
    if not (newest.root / rel).is_dir():
        raise PMAError(f"{newest.label}: no {rel}/ (saved without its optimizer); use --optimizer drop")


@dataclass
class _Labelled:
    layout: layouts.Layout
    label: str


# ---------------------------------------------------------------------------------------------
# Execution


class _Files:
    """Open input files (read) and output files (write, created by whoever writes first)."""

    def __init__(self, fsync: bool = True, threaded: bool = True):
        self._fds: dict[tuple[str, str], int] = {}
        # one writer thread for every output file: the slab ring's reuse rule counts the writes of
        # all of them (a thread per file let a file's pending slab be rewritten for the next file)
        self._writer = writeback.WriteBehind(queue_writeback=fsync, threaded=threaded)
        self._fsync = fsync

    def fd(self, path: Path, mode: str) -> int:
        key = (str(path), mode)
        if key not in self._fds:
            flags = os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_CREAT
            self._fds[key] = os.open(path, flags, 0o666)
        return self._fds[key]

    def write(self, path: Path, data, pos: int) -> int:
        """Hand ``data`` to the writer thread for ``path`` at ``pos`` (:class:`writeback.WriteBehind`)."""
        return self._writer.write(self.fd(path, "w"), data, pos)

    def drain(self) -> None:
        """Everything handed to the writer thread is in the files (then fsync'd when asked)."""
        self._writer.drain()
        if self._fsync:  # each rank syncs what it wrote, in parallel
            for (_, mode), fd in self._fds.items():
                if mode == "w":
                    os.fsync(fd)

    def close(self) -> None:
        self._writer.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread(fd: int, buf: np.ndarray, pos: int, path: Path) -> None:
    raw = buf.view(np.uint8)
    if os.preadv(fd, [raw], pos) != raw.nbytes:
        raise PMAError(f"{path}: truncated data at byte {pos}")


def _write_job(plan: Plan, job: Job, out: Path, files: _Files, scratch: slab_math.Scratch,
               allow_nonfinite: bool) -> None:
    dest = out / job.file
    newest_path = plan.newest.path / job.file
    if not job.merge:  # the header (and the file's full length), or a tensor the newest decides
        if job.name is None:
            os.ftruncate(files.fd(dest, "w"), plan.sizes[job.file])
        if job.payload is not None:
            files.write(dest, job.payload, 0)
            return
        fd = files.fd(newest_path, "r")
        piece = writeback.WriteBehind.PIECE
        for pos in range(0, job.nbytes, piece):
            n = min(piece, job.nbytes - pos)
            files.write(dest, os.pread(fd, n, job.src + pos), job.offset + pos)
        return
    # each input's own offset: headers differ in length (their __metadata__, the tensor order)
    srcs = [(files.fd(c.path / job.file, "r"), c.path / job.file, c.checkpoint.files[job.file].tensors[job.name].offset)
            for c in plan.inputs]
    itemsize = job.dtype.itemsize

    def read(i, buf, first):
        fd, path, offset = srcs[i]
        _pread(fd, buf, offset + first * itemsize, path)

    def nonfinite(first, n):
        wide = np.empty(n, slab_math.acc_dtype(job.dtype))
        raw = np.empty(n, slab_math.raw_dtype(job.dtype))
        for i, c in enumerate(plan.inputs):
            read(i, raw, first)
            if not np.isfinite(slab_math.widen(raw, job.dtype, wide)).all():
                raise PMAError(f"{c.path / job.file}: key {job.name} holds NaN/Inf (pass --allow-nonfinite "
                               "to merge anyway)")
        raise PMAError(f"{newest_path}: key {job.name}: merged values overflow to Inf")

    pos = job.offset
    for slab in slab_math.weighted_slabs(read, plan.weights, job.dtype, job.nbytes // (job.out_dtype or job.dtype).itemsize,
                                         SLAB_ELEMENTS, scratch, not allow_nonfinite, nonfinite, job.out_dtype,
                                         ring=writeback.WriteBehind.RING):
        pos += files.write(dest, slab, pos)  # written by a thread while the next slab is computed


def _my_jobs(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This rank's share: largest first to the least loaded rank (the same on every rank)."""
    load = [0] * world
    mine = []
    for job in sorted(jobs, key=lambda j: (-j.nbytes, j.file, j.offset, j.name or "")):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += max(job.nbytes, 1)
        if r == rank:
            mine.append(job)
    return sorted(mine, key=lambda j: (j.file, j.offset))  # sequential reads and writes


def staging_dirs(plan: Plan) -> list[Path]:
    """Sub-folders of the data dir holding safetensors files (Automodel's ``consolidated/``)."""
    return sorted({Path(rel).parent for rel in plan.newest.checkpoint.files if Path(rel).parent != Path(".")})


def write(plan: Plan, data: Path, group, *, allow_nonfinite: bool, progress, fsync: bool,
          threads: int | None = None) -> tuple[dict, dict, dict]:
    """This rank's tensors, written in place, and its share of an averaged DCP optimizer:
    ({file: bytes written}, {chunk: storage info}, {file: sha256})."""
    mine = _my_jobs(plan.jobs, group.rank, group.world)
    update, close_bar = progress(sum(j.nbytes for j in mine))
    files, scratch, written = _Files(fsync, threaded=writeback.wants_thread(threads)), slab_math.Scratch(), {}
    try:
        for job in mine:
            _write_job(plan, job, data, files, scratch, allow_nonfinite)
            written[job.file] = written.get(job.file, 0) + job.nbytes
            update(job.nbytes)
        files.drain()
    except OSError as e:
        raise PMAError(f"{data}: write failed ({os.strerror(e.errno) if e.errno else e})") from None
    finally:
        files.close()
        close_bar()
    if plan.optim is None:
        return written, {}, {}
    storage, digests = dcp_optimizer.write(plan.optim, _optim_out(plan, data), group,
                                           allow_nonfinite=allow_nonfinite, fsync=fsync)
    return written, storage, digests


def _optim_out(plan: Plan, data: Path) -> Path:
    """Where the output's DCP optimizer goes: beside the weights, as in the newest input."""
    top = data
    for _ in Path(plan.newest.layout.data_subdir).parts:  # up to the output's top
        top = top.parent
    return top / plan.newest.layout.optimizer_subdir / dcp_optimizer.DCP_DIR


def fields(plan: Plan, written: dict, storage: dict, digests: dict) -> dict:
    """What this format adds to pma_provenance.json."""
    out = dict(format=NAME, files=len(plan.newest.checkpoint.files), tensors=plan.tensors,
               tensors_averaged=plan.merged)
    rel = plan.newest.layout.optimizer_subdir
    if rel and (plan.newest.root / rel).is_dir():
        out["optimizer_state"] = {
            "average": f"{rel}/: moments averaged; step counts, param groups, scheduler the newest input's",
            "keep-last-moments": f"{rel}/: the newest input's",
            "drop": f"{rel}/: left out (--optimizer drop)"}[plan.optimizer]
    return out


def finish(plan: Plan, data: Path, written: dict, storage: dict, digests: dict, left_out: dict) -> None:
    """Rank 0, after every rank wrote: the newest input's indexes and other files; its optimizer
    folder (NeMo-RL DTensor: policy/optimizer/) averaged or, with keep-last-moments, as it is."""
    _copy_rest(plan.newest.path, data, set(left_out), set(plan.newest.checkpoint.files))
    if plan.retyped:  # --save-dtype: the indexes' total_size counts the new bytes
        for index in plan.newest.checkpoint.indexes:
            _resize_index(data, index, plan)
    if plan.optim is not None:
        dcp_optimizer.finish(plan.optim, _optim_out(plan, data), storage, digests)
    elif plan.optimizer == "keep-last-moments" and plan.newest.layout.optimizer_subdir:
        out = _optim_out(plan, data).parent
        shutil.copytree(plan.newest.root / plan.newest.layout.optimizer_subdir, out, symlinks=True)


def _resize_index(data: Path, rel: str, plan: Plan) -> None:
    """An index's ``metadata.total_size`` after --save-dtype (shard names are relative to it)."""
    file = data / rel
    index = json.loads(file.read_text())
    shards = {str(Path(rel).parent / f) for f in set(index["weight_map"].values())}
    index.setdefault("metadata", {})["total_size"] = sum(j.nbytes for j in plan.jobs if j.name and j.file in shards)
    file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_rest(src: Path, dst: Path, left_out: set[str], tensor_files: set[str], rel: Path = Path(".")) -> None:
    for entry in os.scandir(src):
        name = str(rel / entry.name)
        if name in tensor_files or name in left_out or entry.name == PROVENANCE_FILE:
            continue
        # links are followed: a Hugging Face cache snapshot links its files into ../../blobs
        if entry.is_dir():
            (dst / entry.name).mkdir(exist_ok=True)
            _copy_rest(Path(entry.path), dst / entry.name, left_out, tensor_files, rel / entry.name)
        else:
            shutil.copy2(entry.path, dst / entry.name)


def summary(plan: Plan, output: Path, written: dict, storage: dict, digests: dict) -> tuple[int, int]:
    """(tensor bytes written, tensors) for the result (an averaged optimizer's bytes included)."""
    optim = sum(j.nbytes for j in plan.optim.jobs) if plan.optim else 0
    return sum(j.nbytes for j in plan.jobs if j.name is not None) + optim, plan.tensors


# ---------------------------------------------------------------------------------------------
# inspect


def describe(path: Path) -> dict:
    """What ``megatron-pma inspect`` shows for a safetensors checkpoint (same fields as torch_dist)."""
    c = load_input(Path(path))
    keys = [{"key": f"{rel}:{t.name}" if len(c.checkpoint.files) > 1 else t.name, "shape": list(t.shape),
             "dtype": t.dtype.name, "chunks": 1, "role": "model"}
            for rel, f in c.checkpoint.files.items() for t in f.tensors.values()]
    return {"path": str(path), "format": f"{c.layout.name}: safetensors",
            "metadata_json": None, "iteration": c.iteration, "tokens": None, "parallel": None,
            "optimizer_state": "none", "files": len(c.checkpoint.files), "keys": keys, "layout": c.layout.name,
            "tensor_bytes": sum(t.nbytes for f in c.checkpoint.files.values() for t in f.tensors.values())}
