"""Start the disk writing of freshly written bytes early, so that the closing fsync finds little left.

Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues a range for writeback and returns at
once: the disk then works while the merge computes the next chunk, instead of all the writing
waiting for ``fsync`` at the end. Elsewhere (or where the call fails) it does nothing; the
fsync that follows is what makes the data durable either way.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading

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


def wants_thread(threads: int | None) -> bool:
    """A write-behind thread pays where the process may use a second core (None: assume it may)."""
    return threads is None or threads > 1


class WriteBehind:
    """Positioned writes to one file descriptor, done by a background thread: the copy into the
    page cache and the disk's writeback then overlap the merge's arithmetic instead of following
    it (a one-process merge spent half its time inside write()). Ranges of ``step`` bytes are
    queued for writeback (:func:`start`) as they are written when ``queue_writeback``.

    :meth:`write` hands a buffer over and returns once the write handed over two calls earlier is
    done, so a caller may change a buffer again after two later ones were handed over
    (``slab_math.weighted_slabs(ring=RING)``). The first error is raised by the next
    call, or by :meth:`drain`; later writes are then skipped. ``threaded=False`` writes in the
    caller's thread instead (a process with no spare core: the thread would only add switching)."""

    RING = 3  # buffers a caller rotates: one being filled, one queued, one being written
    PIECE = 16 << 20  # bytes per write when copying a range: at most RING pieces are in memory
    _STOP = object()

    def __init__(self, fd: int, queue_writeback: bool, threaded: bool = True, step: int = 16 << 20):
        self._fd, self._queue_writeback, self._step = fd, queue_writeback, step
        self._lo = self._hi = 0  # written but not yet queued for writeback (the writing thread's)
        self._error: BaseException | None = None
        self._items: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="pma-write-behind", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def write(self, data, pos: int) -> int:
        """Hand ``data`` over to be written at ``pos``; returns its length in bytes."""
        self._raise()
        view = memoryview(data).cast("B")
        nbytes = view.nbytes
        if self._thread is None:
            self._pwrite(view, pos)
        else:
            self._items.put((view, pos))
        return nbytes

    def drain(self) -> None:
        """Wait until everything handed over is written (and queued for writeback)."""
        if self._thread is not None:
            self._items.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread (after what was handed over); errors are left to :meth:`drain`."""
        if self._thread is None:
            self._flush_range()
        elif self._thread.is_alive():
            self._items.put(self._STOP)
            self._thread.join()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._items.get()
            try:
                if item is self._STOP:
                    self._flush_range()
                    return
                if self._error is None:
                    self._pwrite(*item)
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                self._items.task_done()

    def _pwrite(self, view: memoryview, pos: int) -> None:
        first = pos
        while view.nbytes:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        if not self._queue_writeback:
            return
        if first != self._hi:  # not where the last write ended: queue that range, start anew
            self._flush_range()
            self._lo = first
        self._hi = pos
        if self._hi - self._lo >= self._step:
            self._flush_range()

    def _flush_range(self) -> None:
        if self._queue_writeback and self._hi > self._lo:
            start(self._fd, self._lo, self._hi - self._lo)
        self._lo = self._hi
