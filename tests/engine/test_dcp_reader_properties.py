"""Property tests for the chunk reader: any tensor torch.save writes at any offset of a file is
located exactly (shape, dtype, bytes), and DCP metadata round-trips through our pickler."""

import io
import os
import pickle
import random
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pma.checkpoint import dcp, dcp_types
from megatron_pma.errors import PMAError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


def _read(loc, numel):
    out = torch.empty(numel, dtype=loc.dtype.torch)
    with open(loc.path, "rb") as f:
        os.preadv(f.fileno(), [out.view(torch.uint8).numpy()], loc.data_offset)
    return out


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=0, max_size=3), dtype=st.sampled_from(DTYPES),
       pad=st.integers(0, 5000), seed=st.integers(0, 2**31 - 1))
def test_locate_any_saved_tensor(shape, dtype, pad, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 100).to(dtype)
    blob = io.BytesIO()
    torch.save(t, blob)
    with tempfile.NamedTemporaryFile() as f:
        junk = random.Random(seed)  # from the example, never os.urandom: a failure must replay
        f.write(junk.randbytes(pad))
        f.write(blob.getvalue())
        f.write(junk.randbytes(17))
        f.flush()
        with open(f.name, "rb") as r:
            loc = dcp.locate_tensor(r, f.name, pad, len(blob.getvalue()))
        assert loc.contiguous and loc.dtype == dtype and tuple(loc.shape) == tuple(shape)
        assert torch.equal(_read(loc, t.numel()).view(t.shape), t)


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, 40), length=st.integers(0, 40))
def test_views_are_detected_as_strided(start, length):
    """torch.save of a view stores the whole storage: the reader must not read the wrong bytes."""
    base = torch.arange(100, dtype=torch.float32)
    view = base[start:start + length]
    blob = io.BytesIO()
    torch.save(view, blob)
    with tempfile.NamedTemporaryFile() as f:
        f.write(blob.getvalue())
        f.flush()
        with open(f.name, "rb") as r:
            loc = dcp.locate_tensor(r, f.name, 0, len(blob.getvalue()))
        if loc.contiguous:
            assert torch.equal(_read(loc, view.numel()), view)
        else:
            assert torch.equal(dcp.load_blob_tensor(f.name, 0, len(blob.getvalue())), view)


@settings(max_examples=40, deadline=None)
@given(junk=st.binary(min_size=0, max_size=300))
def test_garbage_blob_is_one_clear_error(junk):
    with tempfile.NamedTemporaryFile() as f:
        f.write(junk)
        f.flush()
        with open(f.name, "rb") as r, pytest.raises(PMAError, match="corrupted|shorter"):
            dcp.locate_tensor(r, f.name, 0, len(junk))


@settings(max_examples=30, deadline=None)
@given(entries=st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(0, 2**40), st.integers(0, 2**30)),
                        min_size=0, max_size=20))
def test_storage_info_pickles_as_torch_class(entries):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    infos = [dcp_types.StorageInfo(name, off, length) for name, off, length in entries]
    back = pickle.loads(dcp_types.dumps(infos))
    assert all(type(b) is _StorageInfo for b in back)
    assert [(b.relative_path, b.offset, b.length, b.transform_descriptors) for b in back] == \
        [(n, o, l, None) for n, o, l in entries]
