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
    """Positioned writes done by one background thread per process: the copy into the page
    cache and the disk's writeback then overlap the merge's arithmetic instead of following it
    (a one-process merge spent half its time inside write()). Ranges of ``step`` bytes of each
    file are queued for writeback (:func:`start`) as they are written when ``queue_writeback``.

    :meth:`write` hands a buffer over and returns once the write handed over two calls earlier is
    done, whichever file either goes to, so a caller may change a buffer again after two later
    ones were handed over (``slab_math.weighted_slabs(ring=RING)``). That holds only for writes
    through the same instance: a process writing several files at once shares one (one thread
    per file let a file's pending slab be rewritten for the next file's tensor). The first error
    is raised by the next call, or by :meth:`drain`; later writes are then skipped.
    ``threaded=False`` writes in the caller's thread instead (a process with no spare core: the
    thread would only add switching)."""

    RING = 3  # buffers a caller rotates: one being filled, one queued, one being written
    PIECE = 16 << 20  # bytes per write when copying a range: at most RING pieces are in memory
    _STOP = object()

    def __init__(self, queue_writeback: bool, threaded: bool = True, step: int = 16 << 20):
        self._queue_writeback, self._step = queue_writeback, step
        self._ranges: dict[int, list[int]] = {}  # fd -> [lo, hi): written, not yet queued for writeback
        self._error: BaseException | None = None
        self._items: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="pma-write-behind", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def write(self, fd: int, data, pos: int) -> int:
        """Hand ``data`` over to be written to ``fd`` at ``pos``; returns its length in bytes."""
        self._raise()
        view = memoryview(data).cast("B")
        nbytes = view.nbytes
        if self._thread is None:
            self._pwrite(fd, view, pos)
        else:
            self._items.put((fd, view, pos))
        return nbytes

    def drain(self) -> None:
        """Wait until everything handed over is written (and queued for writeback)."""
        if self._thread is not None:
            self._items.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread (after what was handed over); errors are left to :meth:`drain`.
        Call it before closing the file descriptors written to."""
        if self._thread is None:
            self._flush_ranges()
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
                    self._flush_ranges()
                    return
                if self._error is None:
                    self._pwrite(*item)
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                self._items.task_done()

    def _pwrite(self, fd: int, view: memoryview, pos: int) -> None:
        first = pos
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        if not self._queue_writeback:
            return
        r = self._ranges.setdefault(fd, [first, first])
        if first != r[1]:  # not where the file's last write ended: queue that range, start anew
            self._flush(fd, r)
            r[0] = first
        r[1] = pos
        if r[1] - r[0] >= self._step:
            self._flush(fd, r)

    def _flush(self, fd: int, r: list[int]) -> None:
        if r[1] > r[0]:
            start(fd, r[0], r[1] - r[0])
        r[0] = r[1]

    def _flush_ranges(self) -> None:
        if self._queue_writeback:
            for fd, r in self._ranges.items():
                self._flush(fd, r)
