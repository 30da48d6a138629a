"""The ``torch_dist`` format (Megatron-Core's PyTorch DCP checkpoints): plan, then a per-rank
streaming weighted sum written as DCP files.

No model is built and nothing is resharded: every stored chunk (key, offsets) of the output is
the weighted sum of the same chunk of every input, accumulated in fp32 slab by slab and streamed
to the output in the input dtype.
Memory per process is a few 2 MiB slabs, whatever the model size or k (a chunk past 4 GiB, which
needs ZIP64, is assembled whole for torch.save). numpy does the arithmetic: torch is never
imported. Under ``torchrun`` / ``srun`` / ``--workers`` the output files are split over ranks;
which chunk lands in which output file does not depend on the number of processes, so 1 and P
processes write the same bytes. Where the files sit and what surrounds them is the layout's
business (:mod:`megatron_pma.layouts`); publishing is :mod:`megatron_pma.merge`'s.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_pma import input_order, layouts, schedules, slab_math
from megatron_pma.checkpoint import dcp, dcp_types, integrity, legacy, torch_zip, writeback
from megatron_pma.checkpoint.dcp_types import (
    DType,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
)
from megatron_pma.checkpoint.discovery import check_checkpoint_dir, is_complete
from megatron_pma.checkpoint.common_state import read_common_state
from megatron_pma.errors import PMAError, UnknownIteration
from megatron_pma.layouts import Layout
from megatron_pma.names import PROVENANCE_FILE, SAVE_DTYPES, is_extra_state

NAME = "torch_dist"
# 512 Ki elements (2 MiB of fp32): the accumulator and read buffer of a slab stay in the CPU cache
# while the k inputs are added, so each input byte crosses DRAM once (the page-cache copy); three
# accumulators rotate behind the write thread (1 Mi measured no faster, 8 MiB more resident).
SLAB_ELEMENTS = 1 << 19
_CHAINED = re.compile(r"^chained_\d+\.")
_STATE_ROLES = {"fp32_param": "param", "param": "param", "exp_avg": "moment", "exp_avg_sq": "moment"}
# Files we regenerate; everything else at the top of the newest input is copied verbatim.
_REGENERATED = {dcp.METADATA_FILE, PROVENANCE_FILE, "integrity.json"}
_COMMON_STATE = "common_state"  # megatron-core >= 0.19: the common state's byte object key prefix


@dataclass
class InputCheckpoint:
    path: Path                  # the torch_dist files (a NeMo 2 checkpoint's weights/)
    iteration: int | None       # None: unknown (only with order="given")
    metadata: Metadata
    root: Path | None = None    # the checkpoint dir when the files are below it (NeMo 2), else None
    layout: Layout = layouts.LAYOUTS[-1]

    @property
    def outer(self) -> Path:
        return self.root or self.path

    @property
    def label(self) -> str:
        return str(self.outer)


@dataclass
class Job:
    """One output item: a tensor chunk (merged or copied) or a byte object (copied)."""

    key: str
    offsets: tuple | None          # None for byte objects
    shape: tuple = ()
    dtype: DType | None = None
    merge: bool = True             # False: take the newest input's bytes
    nbytes: int = 0                # output bytes
    out_dtype: DType | None = None  # --save-dtype: written as this (None: as dtype)
    payload: bytes | None = None   # written instead of the newest input's bytes (stamped common state)

    @property
    def index(self) -> MetadataIndex:
        return MetadataIndex(self.key, self.offsets)


@dataclass
class MergePlan:
    inputs: list[InputCheckpoint]
    weights: list[float]
    jobs: list[Job]
    num_files: int
    kept_keys: list[str]
    method: str
    optimizer: str
    verify_integrity: bool = False
    iteration: int | None = None   # the output's (written into its common state when it differs)
    warning: str | None = None     # one line for the user (weights vs. inputs typed out of order)

    @property
    def newest(self) -> InputCheckpoint:
        return self.inputs[-1]

    @property
    def restamped(self) -> bool:
        """The output's iteration differs from the newest input's: its common state is rewritten."""
        return self.iteration is not None and self.iteration != self.newest.iteration

    @property
    def unflagged(self) -> bool:
        """--optimizer drop where the layout reads the common state's ``optimizer`` entry as
        "optimizer saved" (NeMo-RL): the output's common state loses that entry."""
        return self.optimizer == "drop" and self.newest.layout.optimizer_flag_in_common_state

    def files(self) -> list[list[Job]]:
        """Deterministic, balanced assignment of jobs to output files (largest first)."""
        buckets: list[list[Job]] = [[] for _ in range(self.num_files)]
        load = [0] * self.num_files
        for job in sorted(self.jobs, key=lambda j: (-j.nbytes, j.key, j.offsets or ())):
            b = min(range(self.num_files), key=lambda i: (load[i], i))
            buckets[b].append(job)
            load[b] += max(job.nbytes, 1)
        for bucket in buckets:  # write in key order: friendlier to readers
            bucket.sort(key=lambda j: (j.key, j.offsets or ()))
        return buckets


# ---------------------------------------------------------------------------------------------
# Key roles (Megatron naming, see megatron-core dist_checkpointing/optimizer.py and
# optimizer/distrib_optimizer.py)


def optimizer_role(key: str) -> str | None:
    """None for model state; "param" for fp32 main params; "moment" for Adam moments; "other".

    The model key inside an optimizer key may carry a wrapper prefix (NeMo 2: ``module.``), and
    a ChainedOptimizer of several optimizers (MoE: dense + expert) prefixes ``chained_<i>.``.
    """
    key = _CHAINED.sub("", key, count=1)
    if not key.startswith("optimizer."):
        return None
    parts = key.split(".")
    if key.startswith("optimizer.state.") and len(parts) > 3:
        # optimizer.state.<kind>.<model key>: only <kind> says what it is, whatever the model key
        return _STATE_ROLES.get(parts[2], "other")
    if "fp32_param" in parts or parts[-1] == "param":
        return "param"
    if "exp_avg" in parts or "exp_avg_sq" in parts or parts[-1] in ("exp_avg", "exp_avg_sq"):
        return "moment"
    return "other"


def _keep_key(key: str, optimizer: str) -> bool:
    return not (optimizer == "drop" and optimizer_role(key) is not None)


def _merge_key(key: str, optimizer: str, dtype: DType) -> bool:
    if not dtype.is_floating_point or is_extra_state(key):
        return False  # step counters, Transformer Engine's FP8 scales / amax history: newest wins
    role = optimizer_role(key)
    if role is None or role == "param":
        return True  # model weights and the fp32 master copy must move together (see README)
    return optimizer == "average"  # moments and other optimizer state


# ---------------------------------------------------------------------------------------------
# Planning: every check that can fail runs here, before any output exists.


def load_input(path: Path, unknown_iteration: bool = False) -> InputCheckpoint:
    """One input, checked; ``unknown_iteration``: a checkpoint that does not say its iteration
    loads with iteration None instead of being refused (``order="given"``)."""
    path = Path(path)
    check_checkpoint_dir(path)
    layout = layouts.of_checkpoint(path)
    root = layout.root(path)
    path = layout.data_dir(root)  # NeMo 2: weights/ of a finished save
    if legacy.is_legacy_checkpoint(path):  # the legacy format takes all-legacy sets
        raise PMAError(f"{path}: mixed checkpoint formats: a legacy --ckpt-format torch checkpoint among "
                       "torch_dist ones; merge checkpoints of one format")
    if not is_complete(path):
        raise PMAError(f"{path}: no {dcp.MEGATRON_METADATA_FILE} (incomplete save, or not a "
                       "Megatron dist checkpoint)")
    try:
        meta = json.loads((path / dcp.MEGATRON_METADATA_FILE).read_text())
    except PermissionError:
        raise PMAError(f"{path / dcp.MEGATRON_METADATA_FILE}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PMAError(f"{path / dcp.MEGATRON_METADATA_FILE}: not valid JSON ({e})") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend != "torch_dist":
        raise PMAError(f"{path}: sharded_backend is {backend!r}; only 'torch_dist' is supported")
    md = dcp.read_metadata(path)
    _check_files(path, md)
    state = read_common_state(path, md)  # unreadable common state fails here, before any output exists
    dcp.check_pickles(path, md, root)  # what the merge copies verbatim passed the allowlist too
    try:
        iteration = layout.iteration(root, lambda: state)
    except UnknownIteration:
        if not unknown_iteration:
            raise
        iteration = None
    return InputCheckpoint(path, iteration, md, root if root != path else None, layout)


def _check_files(path: Path, md: Metadata) -> None:
    """Every data file exists and is long enough for the chunks it should hold."""
    needed: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        if getattr(info, "transform_descriptors", None):
            raise PMAError(f"{path}: key {idx.fqn} is stored with transforms "
                           f"{info.transform_descriptors}; not supported")
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        file = path / rel
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise PMAError(f"{file}: missing data file") from None
        if size < end:
            raise PMAError(f"{file}: truncated ({size} bytes, metadata needs {end})")
        if not os.access(file, os.R_OK):
            raise PMAError(f"{file}: permission denied")


def _describe(entry) -> str:
    if isinstance(entry, TensorStorageMetadata):
        return f"{entry.properties.dtype} {list(entry.size)}"
    return "byte object"


def check_layout(inputs: Sequence[InputCheckpoint], optimizer: str) -> list[str]:
    """Same keys, global shapes, dtypes and chunk layout in every input; returns the kept keys.

    Tensors are compared before byte objects: a different parallel layout then reads as
    "sharded differently" rather than as a missing ``rng_state/shard_...`` object.
    """
    ref = inputs[-1]

    def entries(c):
        return {k: v for k, v in c.metadata.state_dict_metadata.items() if _keep_key(k, optimizer)}

    ref_entries = entries(ref)
    for tensors_only in (True, False):
        for other in inputs[:-1]:
            mine = entries(other)
            r_keys = {k for k, v in ref_entries.items() if isinstance(v, TensorStorageMetadata) or not tensors_only}
            o_keys = {k for k, v in mine.items() if isinstance(v, TensorStorageMetadata) or not tensors_only}
            hint = "" if tensors_only else " (saved with a different parallel layout?)"
            if r_keys - o_keys:
                raise PMAError(f"{other.label}: missing key {min(r_keys - o_keys)} (present in {ref.label}){hint}")
            if o_keys - r_keys:
                raise PMAError(f"{other.label}: key {min(o_keys - r_keys)} is not in {ref.label}{hint}")
            for key in sorted(r_keys):
                _compare_entry(key, other, mine[key], ref, ref_entries[key])
    return sorted(ref_entries)


def _compare_entry(key, other, e, ref, r) -> None:
    if type(e) is not type(r):
        raise PMAError(f"{other.label}: key {key} is {_describe(e)}, {ref.label} has {_describe(r)}")
    if not isinstance(r, TensorStorageMetadata):
        return
    if tuple(e.size) != tuple(r.size):
        raise PMAError(f"{other.label}: key {key} has shape {list(e.size)}, {ref.label} has {list(r.size)}")
    if e.properties.dtype != r.properties.dtype:
        raise PMAError(f"{other.label}: key {key} has dtype {e.properties.dtype}, "
                       f"{ref.label} has {r.properties.dtype}")
    chunks_e = sorted((tuple(c.offsets), tuple(c.sizes)) for c in e.chunks)
    chunks_r = sorted((tuple(c.offsets), tuple(c.sizes)) for c in r.chunks)
    if chunks_e != chunks_r:
        raise PMAError(f"{other.label}: key {key} is sharded differently ({len(chunks_e)} chunks vs "
                       f"{len(chunks_r)} in {ref.label}); merge checkpoints saved with the same parallel layout")


def plan_merge(inputs: Sequence[str | Path], *, method: str = "sma", alpha: float = 0.2,
               weights: Sequence[float] | None = None, normalize: bool = False,
               optimizer: str = "drop", num_files: int | None = None,
               verify_integrity: bool = False, order: str = "iteration", save_dtype: str = "input",
               output_iteration: int | None = None, allow_extrapolation: bool = False) -> MergePlan:
    """Every check that can fail, then the jobs. ``output_iteration``: the output's iteration
    (None: the newest input's); when it differs, the common state is stamped with it."""
    if not inputs:
        raise PMAError("no input checkpoints given")
    paths = [Path(p) for p in inputs]
    seen: dict[Path, Path] = {}
    for p in paths:
        try:
            real = layouts.of_checkpoint(p).root(p).resolve()  # a NeMo dir and its weights/ are one
        except PermissionError:
            raise PMAError(f"{p}: permission denied") from None
        if real in seen:
            raise PMAError(f"{p}: the same checkpoint is given twice")
        seen[real] = p
    input_order.check_order(order)
    typed = [load_input(p, unknown_iteration=order == "given") for p in paths]
    loaded = input_order.ordered(typed, order)
    layouts.check_same(loaded)
    w = schedules.weights(method, len(loaded), alpha=alpha, values=weights, normalize=normalize,
                          positions=input_order.positions(loaded),  # WSM samples its decay at these
                          allow_extrapolation=allow_extrapolation)
    warning = input_order.weights_warning(typed, loaded, w, order) if weights is not None else None
    target = _save_dtype(save_dtype)
    kept = check_layout(loaded, optimizer)
    if verify_integrity:
        for c in loaded:
            integrity.verify(c.path)
    newest = loaded[-1]
    restamp = output_iteration is not None and output_iteration != newest.iteration
    unflag = optimizer == "drop" and newest.layout.optimizer_flag_in_common_state
    verbatim = w == [1.0]  # one input at weight 1 (an extrapolated one is scaled)
    jobs: list[Job] = []
    for key in kept:
        entry = newest.metadata.state_dict_metadata[key]
        if isinstance(entry, TensorStorageMetadata):
            dtype = entry.properties.dtype
            merge = _merge_key(key, optimizer, dtype) and not verbatim
            if merge and not slab_math.supported(dtype):
                raise PMAError(f"{newest.label}: key {key} is {dtype}; averaging {dtype} values "
                               "(each checkpoint scaled its own way) is not supported")
            out_dtype = _output_dtype(key, dtype, target)
            for c in entry.chunks:
                jobs.append(Job(key, tuple(c.offsets), tuple(c.sizes), dtype, merge or out_dtype is not None,
                                math.prod(c.sizes) * (out_dtype or dtype).itemsize, out_dtype))
        else:
            payload = (_stamped_common_state(newest, key, output_iteration if restamp else None, unflag)
                       if restamp or unflag else None)
            jobs.append(Job(key, None, merge=False, payload=payload))
    if num_files is None:
        n_in = len({info.relative_path for info in newest.metadata.storage_data.values()})
        num_files = max(n_in, 8)
    num_files = max(1, min(num_files, len(jobs)))
    copied = [j.index for j in jobs if not j.merge and j.offsets is not None]
    dcp.check_tensor_blobs(newest.path, newest.metadata, copied)  # verbatim copies pass the allowlist too
    return MergePlan(loaded, w, jobs, num_files, kept, method, optimizer, verify_integrity,
                     output_iteration if output_iteration is not None else newest.iteration, warning)


def _save_dtype(save_dtype: str) -> DType | None:
    if save_dtype not in SAVE_DTYPES:
        raise PMAError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    name = SAVE_DTYPES[save_dtype]
    return DType.get(name) if name else None


def _output_dtype(key: str, dtype: DType, target: DType | None) -> DType | None:
    """The dtype a model weight is written in when ``--save-dtype`` changes it (None: unchanged).
    Optimizer state, integers, extra state and fp8 keep theirs."""
    if target is None or target == dtype or optimizer_role(key) is not None or is_extra_state(key):
        return None
    return target if slab_math.supported(dtype) else None


def _stamped_common_state(ckpt: InputCheckpoint, key: str, iteration: int | None,
                          drop_optimizer: bool) -> bytes | None:
    """megatron-core >= 0.19 keeps the common state in DCP: its bytes with the output's iteration
    (None: unchanged) and, with ``drop_optimizer``, without its ``optimizer`` entry."""
    if not key.startswith(_COMMON_STATE):
        return None
    from megatron_pma.checkpoint import iteration_stamp

    path, info = _Reader().storage(ckpt, MetadataIndex(key, None))
    blob = dcp.read_bytes(path, info.offset, info.length)
    try:
        return iteration_stamp.stamp_bytes(blob, iteration, drop_optimizer)
    except Exception as e:
        raise PMAError(f"{path}: cannot rewrite the common state ({type(e).__name__}: {e})") from None


def plan(inputs: Sequence[str | Path], group, *, num_files: int | None = None,
         verify_integrity: bool = False, **schedule) -> MergePlan:
    """The format protocol's planner (see :mod:`megatron_pma.formats`)."""
    return plan_merge(inputs, num_files=num_files, verify_integrity=verify_integrity, **schedule)


# ---------------------------------------------------------------------------------------------
# Execution


class _Reader:
    """Per-process cache of open input files and located chunks."""

    def __init__(self):
        self._files: dict[str, object] = {}

    def file(self, path: str):
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)
        return f

    def storage(self, ckpt: InputCheckpoint, index: MetadataIndex):
        info = ckpt.metadata.storage_data.get(index)
        if info is None:  # older metadata may carry a chunk index; match on key + offsets
            info = next((v for i, v in ckpt.metadata.storage_data.items()
                         if i.fqn == index.fqn and tuple(i.offset or ()) == tuple(index.offset or ())), None)
        if info is None:
            raise PMAError(f"{ckpt.label}: no stored data for key {index.fqn} at {list(index.offset or [])}")
        return str(ckpt.path / info.relative_path), info

    def locate(self, ckpt: InputCheckpoint, job: Job) -> dcp.TensorLocation:
        path, info = self.storage(ckpt, job.index)
        loc = dcp.locate_tensor(self.file(path), path, info.offset, info.length)
        if tuple(loc.shape) != tuple(job.shape) or loc.dtype != job.dtype:
            raise PMAError(f"{path}: key {job.key} chunk holds {loc.dtype} {list(loc.shape)}, "
                           f"metadata says {job.dtype} {list(job.shape)}")
        return loc

    def read_into(self, loc: dcp.TensorLocation, buf: np.ndarray, first: int) -> None:
        """Read elements [first, first + buf.size) of a located tensor into ``buf`` (raw view)."""
        raw = buf.view(np.uint8)
        pos = loc.data_offset + first * buf.itemsize
        f = self.file(loc.path)
        got = os.preadv(f.fileno(), [raw], pos)
        if got != raw.nbytes:
            raise PMAError(f"{loc.path}: truncated data at byte {pos}")

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def _merged_slabs(plan: MergePlan, job: Job, reader: _Reader, allow_nonfinite: bool,
                  scratch: slab_math.Scratch):
    """A merged chunk's raw bytes in the input dtype (or ``job.out_dtype``), yielded slab by slab
    (each valid until the next is asked for): :func:`slab_math.weighted_slabs` over the chunk's
    located bytes in every input; only a non-finite sum triggers the exact per-input search."""
    sources = [_source(reader, ckpt, job) for ckpt in plan.inputs]
    # Distributed-optimizer buckets hold padding that Megatron leaves uninitialised (torch.empty):
    # junk there is harmless and must not fail the merge.
    check = not allow_nonfinite and not _CHAINED.sub("", job.key).startswith("optimizer.distributed.")
    yield from slab_math.weighted_slabs(
        lambda i, buf, first: _read_slab(reader, sources[i], buf, first), plan.weights, job.dtype,
        math.prod(job.shape), SLAB_ELEMENTS, scratch, check,
        lambda first, n: _raise_nonfinite(plan, job, reader, sources, scratch, first, n), job.out_dtype,
        ring=writeback.WriteBehind.RING)


def _source(reader: _Reader, ckpt: InputCheckpoint, job: Job):
    """Where a chunk's elements are read from: its located bytes in the file, or (strided storage
    inside the blob: rare) the whole tensor loaded once with torch.load, as raw bytes."""
    loc = reader.locate(ckpt, job)
    if loc.contiguous:
        return loc
    path, info = reader.storage(ckpt, job.index)
    return dcp.load_blob_bytes(path, info.offset, info.length)


def _read_slab(reader: _Reader, src, buf: np.ndarray, first: int) -> None:
    """Elements [first, first + buf.size) of a chunk into ``buf``."""
    if isinstance(src, dcp.TensorLocation):
        reader.read_into(src, buf, first)
    else:
        buf.view(np.uint8)[:] = src[first * buf.itemsize:(first + buf.size) * buf.itemsize]


def _raise_nonfinite(plan, job, reader, sources, scratch, first, n):
    raw = scratch.get(slab_math.raw_dtype(job.dtype), n, "raw")
    wide = scratch.get(slab_math.acc_dtype(job.dtype), n, "wide")
    for ckpt, src in zip(plan.inputs, sources):
        _read_slab(reader, src, raw, first)
        if not np.isfinite(slab_math.widen(raw, job.dtype, wide)).all():
            raise PMAError(f"{ckpt.label}: key {job.key} holds NaN/Inf (pass --allow-nonfinite to merge anyway)")
    raise PMAError(f"key {job.key}: merged values overflow to Inf")


def _save_merged(out: "_Output", job: Job, slabs, scratch: slab_math.Scratch) -> None:
    """A merged chunk as a torch.save blob, streamed slab by slab: no chunk-sized buffer.
    Blobs past 4 GiB need ZIP64: assembled in memory and left to torch.save itself."""
    dtype = job.out_dtype or job.dtype
    writer = torch_zip.TensorWriter.start(out, dcp_types.STORAGE_OF[dtype.name], job.shape)
    if writer is not None:
        for slab in slabs:
            writer.write(slab)
        writer.close()
        return
    import torch

    out.drain()  # torch.save writes through the file object itself
    data, pos = scratch.output(math.prod(job.shape) * dtype.itemsize), 0
    for slab in slabs:
        data[pos:pos + slab.nbytes] = slab.view(np.uint8)
        pos += slab.nbytes
    try:
        torch.save(torch.frombuffer(data, dtype=dtype.torch).view(job.shape), out.file)
        out.moved()
    except RuntimeError as e:  # torch's zip writer hides the OSError
        _reraise_os_error(out.file)
        raise PMAError(f"{out.file.name}: write failed ({e})") from None


class _Output:
    """An output file written behind the merge (:class:`writeback.WriteBehind`): the arithmetic
    of the next slab runs while the last ones go to the page cache and the disk. Buffers handed
    to :meth:`write` must stay unchanged for two more writes (``weighted_slabs(ring=RING)``)."""

    def __init__(self, file, fsync: bool, threaded: bool):
        self.file, self._pos = file, 0
        # one file at a time per process (closed before the next): its own thread is the process's
        self._behind = writeback.WriteBehind(queue_writeback=fsync, threaded=threaded)

    def write(self, data) -> int:
        n = self._behind.write(self.file.fileno(), data, self._pos)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def drain(self) -> None:
        """Everything handed over is in the file; the file object's position is at the end."""
        self._behind.drain()
        self.file.seek(self._pos)

    def moved(self) -> None:
        """Someone wrote through ``file`` itself (after :meth:`drain`): continue at its end."""
        self.file.flush()
        self._pos = self.file.tell()

    def close(self) -> None:
        self._behind.close()


def _write_file(plan: MergePlan, jobs: list[Job], path: Path, reader: _Reader, scratch: slab_math.Scratch,
                allow_nonfinite: bool, progress, fsync: bool, threaded: bool) -> dict[MetadataIndex, StorageInfo]:
    storage: dict[MetadataIndex, StorageInfo] = {}
    try:
        with open(path, "wb") as f:
            out = _Output(f, fsync, threaded)
            try:
                for job in jobs:
                    start = out.tell()
                    if job.merge:
                        _save_merged(out, job, _merged_slabs(plan, job, reader, allow_nonfinite, scratch), scratch)
                    elif job.payload is not None:  # the common state, stamped with the output's iteration
                        out.write(job.payload)
                    else:  # byte objects, and chunks the newest input decides: its blob, verbatim
                        src_path, info = reader.storage(plan.newest, job.index)
                        _copy_range(src_path, info.offset, info.length, out)
                    storage[job.index] = StorageInfo(path.name, start, out.tell() - start)
                    progress(job.nbytes)
                out.drain()
            finally:
                out.close()
            if fsync:  # each rank syncs its own files, in parallel; publish() then finds them clean
                os.fsync(f.fileno())
    except OSError as e:
        raise PMAError(f"{path}: write failed ({os.strerror(e.errno) if e.errno else e})") from None
    return storage


def _copy_range(src_path: str, offset: int, length: int, f, piece: int = writeback.WriteBehind.PIECE) -> None:
    for pos in range(offset, offset + length, piece):  # pieces: a big kept moment never sits in memory whole
        # (at most three pieces are in flight behind _Output)
        f.write(dcp.read_bytes(src_path, pos, min(piece, offset + length - pos)))


def _reraise_os_error(f) -> None:
    """Surface the real OS error (ENOSPC, EFBIG, EIO) behind a failed torch.save."""
    f.write(b"\0")
    f.flush()
    os.fsync(f.fileno())


def _write_metadata(plan: MergePlan, stage: Path, storage: dict) -> None:
    src = plan.newest.metadata
    kept = set(plan.kept_keys)
    state_md = {k: v for k, v in src.state_dict_metadata.items() if k in kept}
    for job in plan.jobs:  # --save-dtype: the new dtype is what loaders allocate
        if job.out_dtype is not None and state_md[job.key].properties.dtype != job.out_dtype:
            e = state_md[job.key]
            state_md[job.key] = TensorStorageMetadata(e.properties.with_dtype(job.out_dtype), e.size, e.chunks)
    planner_data = src.planner_data
    if isinstance(planner_data, dict):
        planner_data = {k: v for k, v in planner_data.items() if k in kept}
    ordered = {}
    for job in sorted(plan.jobs, key=lambda j: (j.key, j.offsets or ())):
        ordered[job.index] = storage[job.index]
    md = Metadata(state_dict_metadata=state_md, planner_data=planner_data, storage_data=ordered,
                  storage_meta=None, version=getattr(src, "version", None))
    mcore_data = getattr(src, "mcore_data", None)
    if mcore_data is not None:  # keep what old megatron readers look for, as a plain attribute
        md.mcore_data = {k: v for k, v in mcore_data.items() if k in kept} if isinstance(mcore_data, dict) else mcore_data
    (stage / dcp.METADATA_FILE).write_bytes(dcp_types.dumps(md))


def _copy_common_files(newest: Path, stage: Path, left_out: set[str]) -> None:
    for entry in os.scandir(newest):
        name = entry.name
        if name in _REGENERATED or name in left_out or name.endswith(".distcp") or name.startswith("."):
            continue
        target = stage / name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True)
        else:
            shutil.copy2(entry.path, target, follow_symlinks=False)


def staging_dirs(plan: MergePlan) -> list[Path]:
    """Folders of the data dir to create before ranks write (none: files sit at its top)."""
    return []


def write(plan: MergePlan, data: Path, group, *, allow_nonfinite: bool, progress, fsync: bool,
          threads: int | None = None) -> tuple[dict, dict]:
    """This rank's share of the output files: ({chunk index: storage info}, {file: sha256}).
    ``threads``: cores this process may use (None: unknown); see writeback.wants_thread."""
    files = plan.files()
    mine = _my_files(files, group.rank, group.world)
    update, close_bar = progress(sum(j.nbytes for b in mine for j in files[b]))
    manifest = _wants_manifest(plan)
    reader = _Reader()
    scratch = slab_math.Scratch()  # one per rank: the output buffer is reused across files
    storage: dict = {}
    digests: dict = {}
    try:
        for b in mine:
            name = f"__{b}_0.distcp"
            storage.update(_write_file(plan, files[b], data / name, reader, scratch, allow_nonfinite, update,
                                       fsync, writeback.wants_thread(threads)))
            if manifest:  # hash while the file is hot in the page cache, on the rank that wrote it
                digests[name] = integrity.file_sha256(data / name)
    finally:
        reader.close()
        close_bar()
    return storage, digests


def fields(plan: MergePlan, storage: dict, digests: dict) -> dict:
    """What this format adds to pma_provenance.json."""
    return dict(keys=len(plan.kept_keys), chunks=len(plan.jobs))


def finish(plan: MergePlan, data: Path, storage: dict, digests: dict, left_out: dict) -> None:
    """Rank 0, after every rank wrote (and after the provenance, which the manifest covers):
    metadata, the newest input's other files, integrity.json."""
    _write_metadata(plan, data, storage)
    _copy_common_files(plan.newest.path, data, set(left_out))
    if (plan.restamped or plan.unflagged) and (data / dcp.COMMON_FILE).exists():  # megatron-core <= 0.18
        from megatron_pma.checkpoint import iteration_stamp

        try:
            iteration_stamp.stamp_file(data / dcp.COMMON_FILE, plan.iteration if plan.restamped else None,
                                       plan.unflagged)
        except Exception as e:
            raise PMAError(f"{plan.newest.path / dcp.COMMON_FILE}: cannot rewrite it "
                           f"({type(e).__name__}: {e})") from None
    if _wants_manifest(plan):
        integrity.write(data, digests)


def summary(plan: MergePlan, output: Path, storage: dict, digests: dict) -> tuple[int, int]:
    """(tensor bytes written, keys) for the result."""
    return sum(j.nbytes for j in plan.jobs), len(plan.kept_keys)


def _wants_manifest(plan: MergePlan) -> bool:
    """An integrity.json for the output when asked, or when the newest input has one (so that
    Megatron's --verify-integrity loads it)."""
    return plan.verify_integrity or (plan.newest.path / integrity.INTEGRITY_FILE).exists()


def _my_files(files: list[list[Job]], rank: int, world: int) -> list[int]:
    """This rank's output files: largest first to the least loaded rank (same on every rank).
    Which rank writes a file does not change its bytes."""
    size = [sum(j.nbytes for j in f) for f in files]
    load = [0] * world
    mine = []
    for b in sorted(range(len(files)), key=lambda b: (-size[b], b)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += max(size[b], 1)
        if r == rank:
            mine.append(b)
    return sorted(mine)
