"""The merge's arithmetic on raw slabs, in numpy (no torch import: see ``checkpoint/dcp_types.py``).

A slab is a run of elements of one stored chunk, held as raw little-endian bytes. Floating
slabs are widened to an accumulator (fp32, or fp64 for fp64 chunks), summed with their weights and
narrowed back to the stored dtype with round-to-nearest-even, as ``torch.Tensor.to`` does.
bfloat16 has no numpy dtype of its own: ``ml_dtypes.bfloat16`` gives it one whose casts are single
compiled passes (in a 1 GiB bf16 merge's CPU profile: widening 1.9x faster than a numpy shift,
rounding 1.5x faster than five numpy integer passes). They are torch's bit for bit: widening is exact,
and rounding equals torch's rule (c10/util/BFloat16.h: add ``0x7FFF + lsb``, keep the high half) on
all 2^32 non-NaN fp32 patterns (checked exhaustively once; tests/engine/test_slab_math.py and
test_torch_free.py compare with torch). NaN -> ``0xFFFF``, as torch's vectorised CPU kernel writes it. Pure functions over
caller-owned buffers; nothing here allocates per slab.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from megatron_pma.checkpoint.dcp_types import DType

_BF16_NAN = 0xFFFF
_BF16 = np.dtype(ml_dtypes.bfloat16)


def raw_dtype(dtype: DType) -> np.dtype:
    """The numpy dtype a chunk's bytes are viewed as (bf16 and fp8: their unsigned bit pattern)."""
    if dtype.numpy is not None:
        return np.dtype(dtype.numpy)
    return np.dtype({1: "u1", 2: "<u2"}[dtype.itemsize])


def acc_dtype(dtype: DType) -> np.dtype:
    return np.dtype("<f8") if dtype.name == "float64" else np.dtype("<f4")


def supported(dtype: DType) -> bool:
    """Floating dtypes merged here (fp8 is not: merging rescaled fp8 bytes makes no sense)."""
    return dtype.name in ("float32", "float64", "float16", "bfloat16")


def widen(raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
    """``raw`` (stored dtype) as the accumulator dtype, into ``out``; exact."""
    if dtype.name == "bfloat16":
        np.copyto(out, raw.view(_BF16), casting="unsafe")
    else:
        np.copyto(out, raw, casting="same_kind")
    return out


def narrow(acc: np.ndarray, dtype: DType, out: np.ndarray, tmp: np.ndarray | None = None,
           finite: bool = False) -> None:
    """``acc`` rounded to the stored dtype into ``out`` (its raw view). ``finite``: the caller
    knows there is no NaN (skips bf16's NaN fix-up). ``tmp``: ignored (the scratch slab of the
    bit-twiddling that the ml_dtypes cast replaced; older callers still pass one)."""
    if dtype.name != "bfloat16":
        np.copyto(out, acc, casting="same_kind")
        return
    with np.errstate(invalid="ignore"):  # NaN: fixed up below
        np.copyto(out.view(_BF16), acc, casting="unsafe")
    if not finite:
        out[np.isnan(acc)] = _BF16_NAN


def all_finite(acc: np.ndarray) -> bool:
    """Exact, in two vectorised reductions: max and min propagate NaN, and an Inf is the max or the
    min (faster than the sum the engine used, which could also overflow to a false alarm)."""
    return bool(np.isfinite(acc.max())) and bool(np.isfinite(acc.min()))


class Scratch:
    """Reusable slab buffers and one output buffer per process (fresh big allocations cost a
    page fault and the kernel's zeroing per 4 KiB: ~0.5 s per GiB of output on a VM)."""

    def __init__(self):
        self._bufs: dict = {}
        self._out = np.empty(0, dtype=np.uint8)
        self._turn = 0

    def slot(self, ring: int) -> int:
        """Which of ``ring`` rotating buffers the next yielded slab goes to: counted across
        tensors, so a tensor's first slab never lands in the buffer just handed to a writer."""
        self._turn += 1
        return self._turn % ring

    def get(self, dtype: np.dtype, n: int, role: str) -> np.ndarray:
        buf = self._bufs.get((dtype, role))
        if buf is None or buf.size < n:
            buf = self._bufs[(dtype, role)] = np.empty(max(n, 1 << 16), dtype=dtype)
        return buf[:n]

    def output(self, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes of the one reused output buffer; valid until the next call."""
        if self._out.size < nbytes:
            self._out = np.empty(0, dtype=np.uint8)  # free the old buffer first
            self._out = np.empty(nbytes, dtype=np.uint8)
        return self._out[:nbytes]


def weighted_slabs(read: Callable[[int, np.ndarray, int], None], weights: Sequence[float], dtype: DType,
                   numel: int, slab: int, scratch: Scratch, check: bool,
                   on_nonfinite: Callable[[int, int], None], out_dtype: DType | None = None,
                   ring: int = 1) -> Iterator[np.ndarray]:
    """sum_i w_i * x_i of one tensor, yielded ``slab`` elements at a time as raw bytes of ``dtype``
    (each valid until ``ring`` more are asked for: a writer thread may still hold the last ones),
    whatever stores the inputs: ``read(i, buf, first)``
    fills ``buf`` with elements [first, first + buf.size) of input i (raw view);
    ``on_nonfinite(first, n)`` raises when ``check`` finds a NaN/Inf in the sum.

    fp32 / fp64: the first input is read straight into the accumulator; the others are widened
    into one reused buffer and added with their weight; the sum is narrowed back (to ``out_dtype``
    when given: --save-dtype)."""
    out_dtype = out_dtype or dtype
    raw_t, acc_t, out_t = raw_dtype(dtype), acc_dtype(dtype), raw_dtype(out_dtype)
    in_place = raw_t == acc_t
    yields_acc = out_t == acc_t
    for first in range(0, numel, slab):
        n = min(slab, numel - first)
        slot = scratch.slot(ring)  # only the buffers that are yielded rotate
        acc = scratch.get(acc_t, n, f"acc{slot}" if yields_acc else "acc")
        raw = scratch.get(raw_t, n, "raw")
        wide = raw if in_place else scratch.get(acc_t, n, "wide")
        for i, w in enumerate(weights):
            read(i, acc if (i == 0 and in_place) else raw, first)
            if not in_place:
                widen(raw, dtype, acc if i == 0 else wide)
            if i == 0:
                np.multiply(acc, w, out=acc)
            else:
                np.multiply(wide, w, out=wide)
                np.add(acc, wide, out=acc)
        # bf16's narrow() wants to know (it skips its NaN fix-up on finite slabs)
        finite = all_finite(acc) if (check or (out_t != acc_t and out_dtype.name == "bfloat16")) else True
        if check and not finite:
            on_nonfinite(first, n)
        if out_t == acc_t:
            yield acc
            continue
        out = raw if (out_dtype is dtype and ring == 1) else scratch.get(out_t, n, f"out{slot}")
        if acc_t != np.float32 and out_dtype.name == "bfloat16":  # fp64 -> fp32 -> bf16, as torch rounds
            f32 = scratch.get(np.dtype(np.float32), n, "f32")
            np.copyto(f32, acc, casting="same_kind")
            acc = f32
        narrow(acc, out_dtype, out, finite=finite)
        yield out
