"""Start the disk writing of freshly written bytes early, so that the closing fsync finds little left.

Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues a range for writeback and returns at
once: the disk then works while the merge computes the next chunk, instead of all the writing
waiting for ``fsync`` at the end. Elsewhere (or where the call fails) it does nothing; the
fsync that follows is what makes the data durable either way.
"""

from __future__ import annotations

import ctypes
import sys

_SYNC_FILE_RANGE_WRITE = 2


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


def start(fd: int, offset: int, length: int) -> None:
    """Queue ``[offset, offset + length)`` of ``fd`` for writeback without waiting for it."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
