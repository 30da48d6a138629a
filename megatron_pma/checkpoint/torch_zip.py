"""Write one contiguous tensor exactly as ``torch.save(tensor, f)`` does, without importing torch.

A ``.distcp`` file is a run of independent ``torch.save`` blobs. Writing each one by hand lets the
merge stream a multi-GiB buffer straight to the file (``f.write(memoryview)``, no copy, no torch
tensor needed) while producing the very bytes torch 2.13 would. What those bytes are, and where
each fact comes from:

* Container: ``caffe2/serialize/inline_container.cc`` (``PyTorchStreamWriter``) on top of miniz
  3.0.2 (``mz_zip_writer_add_mem_ex_v2`` / ``mz_zip_writer_finalize_archive``), opened with
  ``MZ_ZIP_FLAG_WRITE_ZIP64``. Given a file object, the archive folder is ``archive/`` and zip
  offsets count from the blob's first byte. Records, in write order: ``data.pkl``,
  ``.format_version`` (``1``), ``.storage_alignment`` (``64``), ``byteorder`` (``little``),
  ``data/0``, ``version`` (``3\\n``), ``.data/serialization_id``; stored (method 0), DOS time and
  date 0, flags 0x0808 (data descriptor + UTF-8; 0x0800 and no descriptor for an empty record),
  CRC and sizes 0 in the local header, then a 16-byte descriptor after the data.
* Alignment: each local header carries one extra field, id ``FB``, padded with ``Z`` so that the
  record's data starts at a multiple of 64 (``getPadding``). The central directory has no extra.
* End: central directory, then (ZIP64 flag => always) a ZIP64 end record (made by 0x031E,
  needed 0x2D) and locator, then the classic end record.
* ``serialization_id`` (``writeSerializationId``): 20 digits of ``hash_combine`` over the
  ``std::hash`` of every record name, iterated in ``std::unordered_set`` order, then 20 digits of
  ``hash_combine`` over bytes 4..8 (the CRC-32 field) of each write that starts with the
  data-descriptor signature (``ostream_write_func``): every descriptor, in record order, and also
  a record's data itself when it is 8+ bytes starting with ``PK\\x07\\x08``. With one tensor
  the name set never changes, so the first half is a constant (libstdc++ ``_Hash_bytes``, 13
  buckets; re-derived in the tests).
* ``data.pkl``: the protocol-2 pickle of ``_rebuild_tensor_v2(("storage", torch.<X>Storage, "0",
  "cpu", numel), 0, size, stride, False, OrderedDict())`` (``torch/serialization.py:_save``,
  ``Tensor.__reduce_ex__``), emitted opcode by opcode as CPython's pickler does.

Defaults assumed: ``torch.serialization`` CRC on, storage alignment 64, byteorder record on, a
little-endian host. Blobs that would need ZIP64 fields (near 4 GiB) are left to ``torch.save``.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["TensorWriter", "write_tensor"]

# Storage class (what torch pickles for the dtype) -> element size in bytes.
_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8,
}

_PREFIX = b"archive/"
_ALIGN = 64
_SMALL_RECORDS = ((b".format_version", b"1"), (b".storage_alignment", b"64"),
                  (b"byteorder", b"little"))
_VERSION = (b"version", b"3\n")
_SID_NAME = b".data/serialization_id"
_SID_LEN = 40
# First half of serialization_id: hash of the (fixed) set of record names; see module docstring.
_NAME_HASH_DIGITS = b"15728199511854643026"

_LOCAL = struct.Struct("<IHHHHHIIIHH")        # 30 bytes
_DESCRIPTOR = struct.Struct("<IIII")          # 16 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")     # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<IIQI")       # 20 bytes
_END = struct.Struct("<IHHHHIIH")             # 22 bytes
_DESCRIPTOR_SIG = 0x08074B50
_FLAGS_DESCRIPTOR_UTF8 = 0x0808
_FLAGS_UTF8 = 0x0800

# miniz switches to ZIP64 fields once a size or a local-header offset reaches 0xFFFFFFFF (and the
# end record clamps offsets there). Every such value is below the blob's total size, so a blob
# no longer than this never needs them; the 64 KiB margin keeps us clear of off-by-one doubts.
_ZIP32_LIMIT = 0xFFFFFFFF - 0x10000

_M64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _M64)) & _M64


# --- data.pkl ---------------------------------------------------------------------------------

def _pickle_int(n: int) -> bytes:
    """An int as CPython's protocol-2 pickler writes it (BININT1/2, BININT, LONG1)."""
    if 0 <= n < 0x100:
        return b"K" + bytes((n,))
    if 0 <= n < 0x10000:
        return b"M" + struct.pack("<H", n)
    if -0x80000000 <= n <= 0x7FFFFFFF:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() >> 3) + 1, "little", signed=True)
    if n < 0 and len(raw) > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
        raw = raw[:-1]
    return b"\x8a" + bytes((len(raw),)) + raw


class _Pickle:
    """Just enough of a protocol-2 pickler: memoized strings/tuples/reductions, in order."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self) -> None:  # BINPUT (memo stays far below 256 here)
        self.out += b"q" + bytes((self.memo,))
        self.memo += 1

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()
        self.put()

    def text(self, s: str) -> None:
        raw = s.encode()
        self.out += b"X" + struct.pack("<I", len(raw)) + raw
        self.put()

    def int_tuple(self, items: tuple[int, ...]) -> None:
        if not items:
            self.out += b")"  # EMPTY_TUPLE is never memoized
            return
        body = b"".join(_pickle_int(i) for i in items)
        if len(items) <= 3:
            self.out += body + (b"\x85", b"\x86", b"\x87")[len(items) - 1]
        else:
            self.out += b"(" + body + b"t"
        self.put()


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides as torch computes them (a size-0 dim counts as 1)."""
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _data_pkl(storage: str, shape: tuple[int, ...], numel: int) -> bytes:
    p = _Pickle()
    p.glob("torch._utils", "_rebuild_tensor_v2")
    p.out += b"("                                   # args tuple (6 items: MARK ... TUPLE)
    p.out += b"("                                   # persistent id tuple (5 items)
    p.text("storage")
    p.glob("torch", storage)
    p.text("0")
    p.text("cpu")
    p.out += _pickle_int(numel) + b"t"
    p.put()
    p.out += b"Q" + _pickle_int(0)                  # BINPERSID, storage_offset
    p.int_tuple(shape)
    p.int_tuple(contiguous_stride(shape))
    p.out += b"\x89"                                # requires_grad=False
    p.glob("collections", "OrderedDict")
    p.out += b")R"                                  # OrderedDict() -- backward hooks
    p.put()
    p.out += b"t"
    p.put()
    p.out += b"R"
    p.put()
    p.out += b"."
    return bytes(p.out)


# --- zip layout ----------------------------------------------------------------------------

def _header_len(offset: int, name_len: int) -> int:
    """Local header + name + FB extra for a record starting at ``offset`` (data then aligned)."""
    start = offset + _LOCAL.size + len(_PREFIX) + name_len + 4
    return _LOCAL.size + len(_PREFIX) + name_len + 4 + (-start) % _ALIGN


def _local_header(offset: int, name: bytes, size: int) -> bytes:
    full = _PREFIX + name
    pad = _header_len(offset, len(name)) - _LOCAL.size - len(full) - 4
    flags = _FLAGS_DESCRIPTOR_UTF8 if size else _FLAGS_UTF8
    return (_LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), 4 + pad)
            + full + b"FB" + struct.pack("<H", pad) + b"Z" * pad)


def _record_len(offset: int, name: bytes, size: int) -> int:
    return _header_len(offset, len(name)) + size + (_DESCRIPTOR.size if size else 0)


def blob_nbytes(data_nbytes: int, pkl_nbytes: int) -> int:
    """Size of the whole blob for a tensor of ``data_nbytes`` whose data.pkl is ``pkl_nbytes``."""
    names = [(b"data.pkl", pkl_nbytes), *((n, len(v)) for n, v in _SMALL_RECORDS),
             (b"data/0", data_nbytes), (_VERSION[0], len(_VERSION[1])), (_SID_NAME, _SID_LEN)]
    pos = 0
    for name, size in names:
        pos += _record_len(pos, name, size)
    central = sum(_CENTRAL.size + len(_PREFIX) + len(name) for name, _ in names)
    return pos + central + _ZIP64_END.size + _ZIP64_LOCATOR.size + _END.size


def fits_zip32(data_nbytes: int, pkl_nbytes: int) -> bool:
    """Whether torch would write this blob without any ZIP64 extra field (see _ZIP32_LIMIT)."""
    return blob_nbytes(data_nbytes, pkl_nbytes) <= _ZIP32_LIMIT


# --- writer --------------------------------------------------------------------------------

def _as_bytes_view(data) -> memoryview:
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("write_tensor needs a C-contiguous buffer")
    if mv.nbytes == 0:
        return memoryview(b"")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _write_all(f, mv: memoryview) -> None:
    """One write; loop only if a raw file reports a short write (None: assume all, as torch)."""
    while mv.nbytes:
        n = f.write(mv)
        if n is None or n >= mv.nbytes:
            return
        mv = mv[n:]


def _checked(storage: str, shape) -> tuple[tuple[int, ...], int]:
    if storage not in _ITEMSIZE:
        raise ValueError(f"unsupported storage class {storage!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative size in shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    return shape, numel


def write_tensor(f, data, storage: str, shape: tuple[int, ...]) -> int | None:
    """Write `data` (a C-contiguous buffer: bytes/memoryview/numpy array of the tensor's raw
    little-endian bytes) as torch.save would save a contiguous tensor of `shape` whose storage
    class is `storage` (e.g. "FloatStorage", "BFloat16Storage", "HalfStorage", "LongStorage",
    "IntStorage", "ByteStorage", "BoolStorage", "DoubleStorage", "CharStorage", "ShortStorage").
    Returns the number of bytes written, or None (having written NOTHING) when the blob would need
    ZIP64 structures (caller then falls back to torch.save)."""
    mv = _as_bytes_view(data)
    shape, numel = _checked(storage, shape)
    if mv.nbytes != numel * _ITEMSIZE[storage]:
        raise ValueError(f"{mv.nbytes} bytes of data for shape {shape} of {storage}")
    writer = TensorWriter.start(f, storage, shape)
    if writer is None:
        return None
    writer.write(mv)
    return writer.close()


class TensorWriter:
    """One tensor blob streamed: the headers at :meth:`start`, the data in pieces of any size
    (:meth:`write`, CRC-32 updated as it goes), the rest at :meth:`close`. The data descriptor
    after the data is what lets torch (and us) write a record before knowing its CRC."""

    def __init__(self, f, storage: str, shape: tuple[int, ...], numel: int, pkl: bytes, total: int):
        self._f, self.nbytes, self._total = f, numel * _ITEMSIZE[storage], total
        self._records: list[tuple[bytes, int, int, int]] = []  # name, offset, size, crc
        self._crc_chain = 0  # combined_uncomp_crc32_ of PyTorchStreamWriter
        self._pos = 0
        self._crc = 0
        self._written = 0
        self._first8 = b""
        head = bytearray()
        self._small(head, b"data.pkl", pkl)
        for name, payload in _SMALL_RECORDS:
            self._small(head, name, payload)
        self._data_header = self._pos
        header = _local_header(self._pos, b"data/0", self.nbytes)
        head += header
        self._pos += len(header)
        _write_all(f, memoryview(head))

    @classmethod
    def start(cls, f, storage: str, shape: tuple[int, ...]) -> "TensorWriter | None":
        """Write the blob's head; None (nothing written) when it would need ZIP64."""
        shape, numel = _checked(storage, shape)
        pkl = _data_pkl(storage, shape, numel)
        total = blob_nbytes(numel * _ITEMSIZE[storage], len(pkl))
        if total > _ZIP32_LIMIT:
            return None
        return cls(f, storage, shape, numel, pkl, total)

    def write(self, data) -> None:
        mv = _as_bytes_view(data)
        if self._written + mv.nbytes > self.nbytes:
            raise ValueError(f"more than the tensor's {self.nbytes} bytes")
        if len(self._first8) < 8:
            self._first8 += bytes(mv[:8 - len(self._first8)])
        self._crc = zlib.crc32(mv, self._crc)  # over the caller's buffer, no copy
        _write_all(self._f, mv)
        self._written += mv.nbytes

    def close(self) -> int:
        """Finish the blob; returns its size in bytes."""
        if self._written != self.nbytes:
            raise ValueError(f"{self._written} bytes of data written, the tensor has {self.nbytes}")
        self._records.append((b"data/0", self._data_header, self.nbytes, self._crc))
        self._pos += self.nbytes
        tail = bytearray()
        self._finish_record(tail, self._first8, self.nbytes, self._crc)
        self._small(tail, *_VERSION)
        self._small(tail, _SID_NAME, _NAME_HASH_DIGITS + b"%020d" % self._crc_chain)
        central = bytearray()
        for name, offset, size, crc in self._records:
            central += _CENTRAL.pack(0x02014B50, 0, 0, _FLAGS_DESCRIPTOR_UTF8 if size else _FLAGS_UTF8, 0, 0, 0,
                                     crc, size, size, len(_PREFIX) + len(name), 0, 0, 0, 0, 0, offset)
            central += _PREFIX + name
        cd_offset, n = self._pos, len(self._records)
        tail += central
        tail += _ZIP64_END.pack(0x06064B50, _ZIP64_END.size - 12, 0x031E, 0x002D, 0, 0, n, n,
                                len(central), cd_offset)
        tail += _ZIP64_LOCATOR.pack(0x07064B50, 0, cd_offset + len(central), 1)
        tail += _END.pack(0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
        _write_all(self._f, memoryview(tail))
        if hasattr(self._f, "flush"):
            self._f.flush()  # torch.save flushes the buffer it was given
        written = cd_offset + len(central) + _ZIP64_END.size + _ZIP64_LOCATOR.size + _END.size
        assert written == self._total
        return written

    def _finish_record(self, out: bytearray, first8: bytes, size: int, crc: int) -> None:
        """After a record's data: its descriptor, and both into serialization_id's CRC chain."""
        if size >= 8 and first8[:4] == b"PK\x07\x08":  # torch mistakes such data for a descriptor
            self._crc_chain = _hash_combine(self._crc_chain, int.from_bytes(first8[4:8], "little"))
        if size:
            out += _DESCRIPTOR.pack(_DESCRIPTOR_SIG, crc, size, size)
            self._crc_chain = _hash_combine(self._crc_chain, crc)
            self._pos += _DESCRIPTOR.size

    def _small(self, out: bytearray, name: bytes, payload: bytes) -> None:
        crc = zlib.crc32(payload)
        header = _local_header(self._pos, name, len(payload))
        self._records.append((name, self._pos, len(payload), crc))  # the local header's offset
        out += header + payload
        self._pos += len(header) + len(payload)
        self._finish_record(out, payload[:8], len(payload), crc)
