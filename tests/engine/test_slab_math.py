"""slab_math's bfloat16 casts (ml_dtypes) against torch, systematically: every bf16 bit pattern as the high
half, with every rounding class in the low half (exact, just below / at / just above the halfway point,
the largest), so each exponent, mantissa, sign, subnormal, the overflow to Inf and the ties are covered."""

import numpy as np
import pytest
import torch

from megatron_pma import slab_math
from megatron_pma.checkpoint.dcp_types import DType

BF16 = DType.get("bfloat16")
LOW_HALVES = (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)


def test_bf16_round_and_widen_match_torch_on_every_high_half():
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    bits = (high[:, None] | np.array(LOW_HALVES, dtype=np.uint32)[None, :]).ravel()
    acc = bits.view(np.float32)
    finite = np.isfinite(acc)
    out = np.empty(acc.size, dtype=np.uint16)
    slab_math.narrow(acc, BF16, out, np.empty(acc.size, dtype=np.uint32), finite=False)
    want = torch.from_numpy(acc.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out[finite], want[finite])
    assert (out[~finite & ~np.isnan(acc)] == want[~finite & ~np.isnan(acc)]).all()  # +-Inf
    assert (out[np.isnan(acc)] == 0xFFFF).all()  # torch's vectorised kernel's NaN
    wide = slab_math.widen(out, BF16, np.empty(acc.size, dtype=np.float32))
    assert np.array_equal(wide.view(np.uint32), out.astype(np.uint32) << 16)  # exact, NaN payloads too


def test_all_finite_is_exact():
    acc = np.zeros(1000, dtype=np.float32)
    assert slab_math.all_finite(acc)
    acc[:] = np.float32(3e38)  # a sum would overflow: still finite
    assert slab_math.all_finite(acc)
    for bad in (np.inf, -np.inf, np.nan):
        acc[537] = bad
        assert not slab_math.all_finite(acc)
        acc[537] = 0


@pytest.mark.parametrize("dtype,out_dtype", [("float32", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_yielded_slabs_rotate_across_tensors(dtype, out_dtype):
    """The last ``ring`` slabs handed to the write thread are distinct buffers, also when each
    tensor is one slab (a new tensor must not reuse the buffer of the one just yielded)."""
    ring, scratch = 3, slab_math.Scratch()
    dt, out_dt = DType.get(dtype), out_dtype and DType.get(out_dtype)
    addresses = []
    for numel in (5, 3, 7, 4, 6, 8, 2):  # seven one-slab tensors, then one of three slabs
        for slab in slab_math.weighted_slabs(lambda i, buf, first: buf.fill(0), [0.5, 0.5], dt, numel, 8,
                                             scratch, True, None, out_dt, ring=ring):
            addresses.append(slab.__array_interface__["data"][0])
    for slab in slab_math.weighted_slabs(lambda i, buf, first: buf.fill(0), [0.5, 0.5], dt, 24, 8,
                                         scratch, True, None, out_dt, ring=ring):
        addresses.append(slab.__array_interface__["data"][0])
    assert all(len(set(addresses[k:k + ring])) == ring for k in range(len(addresses) - ring + 1))
