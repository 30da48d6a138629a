"""torch_zip.write_tensor's blobs load under the installed torch (always asserted), and are the very
bytes of torch.save(tensor, file_object) where that torch writes the same records as we do.

We write the 7 records of torch >= 2.7 (``.format_version``: pytorch#143879, ``.storage_alignment``:
pytorch#147788; checked here under torch 2.13). torch 2.4-2.6 write 5 records (no
``.format_version`` / ``.storage_alignment``) and still load ours: under them the byte-identity
tests are skipped, the loading ones run."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from megatron_pma.checkpoint import torch_zip

STORAGE = {
    torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage",
    torch.float16: "HalfStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.uint8: "ByteStorage", torch.bool: "BoolStorage", torch.float64: "DoubleStorage",
    torch.int8: "CharStorage", torch.int16: "ShortStorage",
}
SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 5), (0, 3), (4, 1), (1, 1, 7), (2, 1, 3, 2),
          (1, 0, 2, 1, 3), (300,), (70000,)]


def _tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 100
    return (t > 0) if dtype == torch.bool else t.to(dtype)


def _raw(t):
    """What the engine passes: the tensor's bytes as a numpy uint8 array (zero copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _torch_bytes(t) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _records(blob: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [name.split("/", 1)[1] for name in z.namelist()]


def _ours(t, data=None) -> bytes:
    buf = io.BytesIO()
    n = torch_zip.write_tensor(buf, _raw(t) if data is None else data, STORAGE[t.dtype],
                               tuple(t.shape))
    assert n == len(buf.getvalue())
    return buf.getvalue()


SAME_RECORDS = _records(_ours(torch.ones(3))) == _records(_torch_bytes(torch.ones(3)))
byte_identical = pytest.mark.skipif(
    not SAME_RECORDS, reason=f"torch {torch.__version__} writes the records "
                             f"{_records(_torch_bytes(torch.ones(3)))}, not ours: only loading is checked")


def _loads(blob: bytes, t) -> None:
    got = torch.load(io.BytesIO(blob), weights_only=True)
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert z.testzip() is None


def _matches_torch(blob: bytes, t) -> None:
    """Loads under this torch; and is torch.save's bytes where this torch writes our records."""
    _loads(blob, t)
    if SAME_RECORDS:
        assert blob == _torch_bytes(t)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(STORAGE), ids=str)
def test_loads_under_this_torch(dtype, shape):
    t = _tensor(dtype, shape)
    _loads(_ours(t), t)


@byte_identical
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(STORAGE), ids=str)
def test_identical_to_torch_save(dtype, shape):
    t = _tensor(dtype, shape)
    assert _ours(t) == _torch_bytes(t)


def test_identical_for_empty_allocation():
    # the shape/stride cases of torch.empty the engine meets for padding-free chunks (zeros: comparable)
    for shape in [(0,), (0, 3), (3, 0, 1), (4, 1), (1,)]:
        t = torch.zeros(shape, dtype=torch.bfloat16)
        _matches_torch(_ours(t), t)


@pytest.mark.parametrize("shape", [(3 * 2**20 // 4 + 7,), (1021, 771)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_identical_multi_mib(dtype, shape):
    t = _tensor(dtype, shape, seed=1)  # 1.5-3 MiB, odd element count
    _matches_torch(_ours(t), t)


def test_numpy_buffers_bf16_and_fp32():
    for dtype in (torch.bfloat16, torch.float32):
        t = _tensor(dtype, (17, 33), seed=2)
        arr = t.view(torch.uint8).numpy()  # 2-d uint8 view, as the engine will pass
        assert arr.dtype.name == "uint8" and arr.shape == (17, 33 * t.element_size())
        _matches_torch(_ours(t, arr), t)
    t = _tensor(torch.float32, (5, 6), seed=3)
    _matches_torch(_ours(t, t.numpy()), t)  # typed ('f') buffer is fine too
    _matches_torch(_ours(t, t.numpy().tobytes()), t)


def test_data_that_looks_like_a_descriptor():
    # torch's writer hashes any write that starts with PK\x07\x08 into serialization_id
    raw = b"PK\x07\x08" + struct.pack("<I", 0xDEADBEEF) + bytes(range(24))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    _matches_torch(_ours(t), t)
    short = torch.frombuffer(bytearray(b"PK\x07\x08\x01\x02\x03"), dtype=torch.uint8)
    _matches_torch(_ours(short), short)


def test_blobs_back_to_back_in_a_real_file(tmp_path):
    tensors = [_tensor(torch.bfloat16, (64, 33), seed=4), _tensor(torch.float32, (), seed=5),
               _tensor(torch.int64, (0, 3)), _tensor(torch.float32, (1000, 3), seed=6)]
    path = tmp_path / "__0_0.distcp"
    spans = []
    with open(path, "wb") as f:
        f.write(b"\x00junk before the first blob" * 3)
        for t in tensors:
            begin = f.tell()
            n = torch_zip.write_tensor(f, _raw(t), STORAGE[t.dtype], tuple(t.shape))
            assert f.tell() - begin == n
            spans.append((begin, n))
            f.write(b"gap")
    blob = path.read_bytes()
    for t, (begin, n) in zip(tensors, spans):
        region = blob[begin:begin + n]
        _matches_torch(region, t)
        with zipfile.ZipFile(io.BytesIO(region)) as z:
            assert z.read("archive/data/0") == t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_unbuffered_file_and_torch_load_at_offset(tmp_path):
    t = _tensor(torch.float16, (129, 5), seed=7)
    path = tmp_path / "x.bin"
    with open(path, "wb", buffering=0) as f:  # raw FileIO: short writes are handled
        f.write(b"abc")
        n = torch_zip.write_tensor(f, _raw(t), "HalfStorage", (129, 5))
    _matches_torch(path.read_bytes()[3:], t)
    assert n == path.stat().st_size - 3

    class Trickle(io.RawIOBase):  # a raw stream that accepts at most 1000 bytes per call
        def __init__(self):
            self.out = bytearray()

        def writable(self):
            return True

        def write(self, b):
            chunk = memoryview(b).cast("B")[:1000]
            self.out += chunk
            return len(chunk)

    sink = Trickle()
    assert torch_zip.write_tensor(sink, _raw(t), "HalfStorage", (129, 5)) == len(sink.out)
    _matches_torch(bytes(sink.out), t)


def test_zip64_threshold_decision():
    pkl = 150
    limit = torch_zip._ZIP32_LIMIT
    assert limit < 0xFFFFFFFF
    overhead = torch_zip.blob_nbytes(0, pkl)
    assert torch_zip.fits_zip32(2**30, pkl)
    assert not torch_zip.fits_zip32(0xFFFFFFFF, pkl)
    assert not torch_zip.fits_zip32(4 * 2**30, pkl)
    assert not torch_zip.fits_zip32(12 * 2**30, pkl)
    # the boundary: the largest data size that still fits, found from the layout itself
    lo, hi = 0, 0xFFFFFFFF
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if torch_zip.fits_zip32(mid, pkl) else (lo, mid)
    assert torch_zip.blob_nbytes(lo, pkl) <= limit < torch_zip.blob_nbytes(lo + 64, pkl)
    assert 0xFFFFFFFF - 0x20000 < lo < 0xFFFFFFFF - 0x10000 and overhead < 4096
    # blob_nbytes is what write_tensor writes
    for shape in [(0,), (3,), (1000,)]:
        t = _tensor(torch.float32, shape)
        assert torch_zip.blob_nbytes(t.numel() * 4, len(torch_zip._data_pkl(
            "FloatStorage", shape, t.numel()))) == len(_ours(t))


def test_zip64_case_writes_nothing(tmp_path, monkeypatch):
    t = _tensor(torch.float32, (1000,))
    need = len(_ours(t))
    monkeypatch.setattr(torch_zip, "_ZIP32_LIMIT", need - 1)
    path = tmp_path / "f.distcp"
    with open(path, "wb") as f:
        f.write(b"prefix")
        assert torch_zip.write_tensor(f, _raw(t), "FloatStorage", (1000,)) is None
        assert f.tell() == 6
    assert path.read_bytes() == b"prefix"
    monkeypatch.setattr(torch_zip, "_ZIP32_LIMIT", need)
    buf = io.BytesIO()
    assert torch_zip.write_tensor(buf, _raw(t), "FloatStorage", (1000,)) == need


class _FakeStorage:  # stands for the storage object torch's persistent_id maps
    pass


class _FakeTensor:
    def __init__(self, shape, stride):
        self.args = (_FakeStorage(), 0, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


@pytest.mark.parametrize("shape", [(2**31 + 5,), (70000, 70000), (3, 2**33), (2**40,),
                                   (1, 2, 3, 4, 5, 6), (256, 65536, 1)], ids=str)
def test_data_pkl_for_huge_shapes(shape):
    # too big to allocate: pickle the same reduction with torch's Pickler setup instead
    numel = 1
    for s in shape:
        numel *= s

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _FakeStorage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(_FakeTensor(shape, torch_zip.contiguous_stride(shape)))
    assert torch_zip._data_pkl("FloatStorage", shape, numel) == buf.getvalue()


def test_contiguous_stride_matches_torch():
    for shape in SHAPES + [(0, 0), (5, 0, 7), (1, 1), (3, 1, 1, 2)]:
        assert torch_zip.contiguous_stride(shape) == torch.empty(shape).stride(), shape


def test_pickle_int_matches_cpython():
    for n in [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**40 + 3, 2**63, -1,
              -129, -2**31, -2**31 - 1, -2**40]:
        assert torch_zip._pickle_int(n) == pickle.dumps(n, protocol=2)[2:-1], n


def _libstdcxx_hash(b: bytes, seed=0xC70F6907) -> int:
    """std::hash<std::string> on 64-bit libstdc++ (_Hash_bytes, a MurmurHash2 variant)."""
    m64, mul = (1 << 64) - 1, (0xC6A4A793 << 32) + 0x5BD1E995
    h = (seed ^ (len(b) * mul)) & m64
    tail = len(b) & ~7
    for i in range(0, tail, 8):
        d = (int.from_bytes(b[i:i + 8], "little") * mul) & m64
        h = ((h ^ (((d ^ (d >> 47)) * mul) & m64)) * mul) & m64
    if len(b) & 7:
        h = ((h ^ int.from_bytes(b[tail:], "little")) * mul) & m64
    h = ((h ^ (h >> 47)) * mul) & m64
    return h ^ (h >> 47)


@byte_identical
def test_serialization_id_name_hash_derivation():
    # files_written_ is a std::unordered_set: 13 buckets after the first insert; a node goes to
    # the front of its bucket's run, or to the list front when the bucket is empty.
    names = [b"data.pkl", b".format_version", b".storage_alignment", b"byteorder", b"data/0",
             b"version"]
    order: list[bytes] = []
    for name in names:
        bucket = _libstdcxx_hash(name) % 13
        same = [i for i, o in enumerate(order) if _libstdcxx_hash(o) % 13 == bucket]
        order.insert(same[0] if same else 0, name)
    seed = 0
    for name in order:
        seed = torch_zip._hash_combine(seed, _libstdcxx_hash(name))
    assert b"%020d" % seed == torch_zip._NAME_HASH_DIGITS
    with zipfile.ZipFile(io.BytesIO(_torch_bytes(torch.ones(3)))) as z:
        assert z.read("archive/.data/serialization_id")[:20] == torch_zip._NAME_HASH_DIGITS


def test_bad_input_raises_before_writing():
    buf = io.BytesIO()
    with pytest.raises(ValueError):
        torch_zip.write_tensor(buf, b"\x00" * 7, "FloatStorage", (2,))
    with pytest.raises(ValueError):
        torch_zip.write_tensor(buf, b"\x00" * 8, "Float8Storage", (2,))
    with pytest.raises(ValueError):
        torch_zip.write_tensor(buf, torch.ones(4, 4).numpy()[:, ::2], "FloatStorage", (4, 2))
    assert buf.getvalue() == b""


def test_module_does_not_import_torch():
    code = ("import sys, megatron_pma.checkpoint.torch_zip; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("seed", range(6))
def test_streamed_in_pieces_is_identical(seed):
    """TensorWriter fed slab by slab (any piece sizes, the first 8 bytes split, data that starts
    like a data descriptor) writes exactly what torch.save writes for the whole tensor."""
    import random

    rng = random.Random(seed)
    t = _tensor(torch.float32, (rng.randint(1, 3000),), seed)
    if seed % 2:
        t.view(torch.uint8)[:4] = torch.tensor(list(b"PK\x07\x08"), dtype=torch.uint8)
    raw = memoryview(_raw(t)).cast("B")
    buf = io.BytesIO()
    writer = torch_zip.TensorWriter.start(buf, "FloatStorage", tuple(t.shape))
    pos = 0
    while pos < raw.nbytes:
        n = rng.choice([1, 3, 5, 64, 1000, raw.nbytes])
        writer.write(raw[pos:pos + n])
        pos += n
    assert writer.close() == len(buf.getvalue())
    _matches_torch(buf.getvalue(), t)
    short = torch_zip.TensorWriter.start(io.BytesIO(), "FloatStorage", tuple(t.shape))
    with pytest.raises(ValueError):
        short.close()  # fewer bytes than the tensor: refused, never a wrong blob
