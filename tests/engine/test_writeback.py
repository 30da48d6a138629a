"""The write-behind thread of the merge's output files (checkpoint/writeback.py): bytes land where
they were sent, in order, with the buffer-reuse contract the slab loop relies on, and a failed
write surfaces in the caller's thread (nothing is lost silently)."""

from __future__ import annotations

import os

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
        with writeback.WriteBehind(fd, queue_writeback=True, threaded=threaded, step=1 << 18) as w:
            pos = w.write(b"head", 0)
            for slab in _slabs(n, size):
                pos += w.write(slab, pos)
            w.write(b"tail", pos)
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
        w = writeback.WriteBehind(fd, queue_writeback=False, threaded=threaded)
        with pytest.raises(OSError):
            for k in range(4):  # the thread's error surfaces at a later write or at drain()
                w.write(b"x" * 10, k * 10)
            w.drain()
        w.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b""
