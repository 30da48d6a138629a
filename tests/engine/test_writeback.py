"""The write-behind thread of the merge's output files (checkpoint/writeback.py): bytes land where
they were sent, in order, with the buffer-reuse contract the slab loop relies on (across files too),
and a failed write surfaces in the caller's thread (nothing is lost silently)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from megatron_pma.checkpoint import writeback


def _slabs(n: int, size: int):
    """Like slab_math.weighted_slabs(ring=RING): RING buffers, rewritten in turn."""
    ring = [np.empty(size, dtype=np.uint8) for _ in range(writeback.WriteBehind.RING)]
    for k in range(n):
        buf = ring[k % len(ring)]
        buf[:] = k % 251
        yield buf


@pytest.mark.parametrize("threaded", [True, False])
def test_reused_buffers_land_intact_in_order(tmp_path, threaded):
    path, size, n = tmp_path / "out.bin", 1 << 16, 200
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with writeback.WriteBehind(queue_writeback=True, threaded=threaded, step=1 << 18) as w:
            pos = w.write(fd, b"head", 0)
            for slab in _slabs(n, size):
                pos += w.write(fd, slab, pos)
            w.write(fd, b"tail", pos)
            w.drain()
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4] == b"head" and data[-4:] == b"tail" and len(data) == 8 + n * size
    body = np.frombuffer(data[4:-4], dtype=np.uint8).reshape(n, size)
    assert (body == (np.arange(n) % 251)[:, None]).all()


@pytest.mark.parametrize("threaded", [True, False])
def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path, threaded):
    path = tmp_path / "ro.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # pwrite fails with EBADF
    try:
        w = writeback.WriteBehind(queue_writeback=False, threaded=threaded)
        with pytest.raises(OSError):
            for k in range(4):  # the thread's error surfaces at a later write or at drain()
                w.write(fd, b"x" * 10, k * 10)
            w.drain()
        w.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


def test_a_buffer_is_reusable_after_two_later_writes_to_any_file(tmp_path, monkeypatch):
    """The reuse rule holds across files: the write of a buffer to file A is held back until the
    caller has reused the buffer (or 1 s has passed); the caller reuses it after handing over two
    writes to file B. The third write() cannot return before A's write is done, so A gets the
    bytes it was handed. (A thread per file broke this: the merge of several safetensors files put
    the next file's slab into a buffer still queued for the previous one.) The pass does not
    depend on the timing: the hold only makes a broken rule certain to show."""
    paths = [tmp_path / "a.bin", tmp_path / "b.bin"]
    fa, fb = (os.open(p, os.O_WRONLY | os.O_CREAT) for p in paths)
    reused, real_pwrite = threading.Event(), os.pwrite

    def held_back(fd, data, pos):
        if fd == fa:
            reused.wait(timeout=1.0)
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(writeback.os, "pwrite", held_back)
    buf = np.full(1 << 16, 1, dtype=np.uint8)
    try:
        with writeback.WriteBehind(queue_writeback=True, threaded=True) as w:
            w.write(fa, buf, 0)
            w.write(fb, b"x", 0)
            w.write(fb, b"y", 1)
            buf[:] = 2  # allowed now
            reused.set()
            w.drain()
    finally:
        os.close(fa)
        os.close(fb)
    assert paths[0].read_bytes() == bytes([1]) * (1 << 16) and paths[1].read_bytes() == b"xy"
