"""Process groups for multi-process merging: torchrun, srun, an existing process group, or
worker processes forked by the merge itself (``--workers N``: no launcher, no ``import torch``).

The merge only needs to agree on errors and to gather small dicts, so every collective is one
all-gather of a picklable object (:meth:`Group._allgather`), carried by a transport:

* launched groups (torchrun, srun, an initialised ``torch.distributed``): gloo, which works on
  CPU nodes and GPU nodes alike and touches no accelerator. ``torch.distributed`` is imported
  only on these paths;
* forked groups (:meth:`Group.forked`): length-prefixed pickles over a ``socketpair`` between
  rank 0 and each worker. Rank 0 gathers every worker's object, then sends the whole list back.

This module does not import torch, so a ``--workers`` merge never pays for it here.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import signal
import socket
import struct
import sys

_REFUSE_FORK = "--workers cannot be combined with torchrun/srun or an initialised process group"


def _env_rank_world() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # srun without torchrun: one task per process
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


def _initialised_dist():
    """``torch.distributed`` if this process already imported it and initialised a group, else None.

    Never imports torch: a process that has not imported ``torch.distributed`` has no group.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def launched() -> bool:
    """This process is already one rank of several (torchrun / srun variables, or an initialised
    ``torch.distributed``): it must not fork workers of its own. One task of one (``srun -n 1``)
    is not: it may."""
    rank_world = _env_rank_world()
    return _initialised_dist() is not None or (rank_world is not None and rank_world[1] > 1)


class Group:
    """rank / world plus the collectives the merge needs; a no-op for one process."""

    def __init__(self, rank: int = 0, world: int = 1, transport: "_Transport | None" = None,
                 children: tuple[int, ...] = ()):
        self.rank, self.world, self._transport = rank, world, transport
        self.pg = getattr(transport, "pg", None)  # the gloo side group, if one was made
        self._children = children  # pids of forked workers (rank 0 of a forked group only)
        self.forked_worker = False  # True in a forked worker: close() ends the process

    @classmethod
    def from_env(cls) -> "Group":
        """The group this process was launched in: an initialised ``torch.distributed`` group,
        torchrun / srun environment variables (a new gloo group), or else one process."""
        dist = _initialised_dist()
        if dist is not None:
            # A CPU-capable side group, so collectives work even when the default one is nccl.
            pg = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
            return cls(dist.get_rank(), dist.get_world_size(), _GlooTransport(pg, owned=False))
        rw = _env_rank_world()
        if rw is None or rw[1] <= 1:
            return cls()
        import torch.distributed as dist

        rank, world = rw
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, _GlooTransport(None, owned=True))

    @classmethod
    def forked(cls, workers: int) -> "Group":
        """This process (rank 0) and ``workers - 1`` forked copies of it as one group.

        Every process returns from here and runs the same code; a forked worker's ``close()``
        ends it. Each worker talks to rank 0 over its own ``socketpair``, made just before its
        fork: no ports, no threads, no torch. Workers die with their parent, so a killed merge
        leaves no writer behind.
        """
        if launched():
            raise RuntimeError(_REFUSE_FORK)
        for stream in (sys.stdout, sys.stderr):  # else a child would write the buffered text again
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        parent = os.getpid()
        socks: list[socket.socket] = []  # rank 0's end of each worker's pair, in rank order
        children: list[int] = []
        try:
            for r in range(1, workers):
                mine, theirs = socket.socketpair()
                pid = os.fork()
                if pid == 0:
                    try:
                        for s in (*socks, mine):  # rank 0's ends: a worker keeps only its own link
                            s.close()
                        _die_with_parent(parent)
                        group = cls(r, workers, _SocketTransport(r, workers, [theirs]))
                        group.forked_worker = True
                        return group
                    except BaseException:
                        os._exit(1)  # never run the parent's code (or kill its other workers)
                theirs.close()
                socks.append(mine)
                children.append(pid)
        except BaseException:
            for s in socks:
                s.close()
            _kill_and_reap(children)
            raise
        return cls(0, workers, _SocketTransport(0, workers, socks, children), children=tuple(children))

    # -- collectives: each is one all-gather, so every rank gets the same answer -------------

    def _allgather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        return self._transport.allgather(obj)

    def first_error(self, error: str | None) -> str | None:
        """Every rank learns the first (lowest-rank) error, so all fail or all succeed."""
        return next((e for e in self._allgather(error) if e), None)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return self._allgather(obj if self.rank == 0 else None)[0]

    def gather_dicts(self, d: dict) -> dict:
        """The union of every rank's dict (a later rank's value wins a shared key)."""
        merged: dict = {}
        for part in self._allgather(d):
            merged.update(part)
        return merged

    def close(self) -> None:
        """Leave the group once every rank is done with it. A forked worker ends here
        (``os._exit(0)``: the parent reports the agreed result; the caller's code never runs
        twice); rank 0 of a forked group waits for its workers."""
        try:
            if self._transport is not None:
                self._transport.close()
        finally:
            if self.forked_worker:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (AttributeError, OSError, ValueError):
                        pass
                os._exit(0)


class _Transport:
    """How a group's ranks exchange one object each."""

    pg = None

    def allgather(self, obj) -> list:
        raise NotImplementedError

    def close(self) -> None:
        """Barrier, then tear down; a rank may leave only once every rank is done."""
        raise NotImplementedError


class _GlooTransport(_Transport):
    """torch.distributed gloo (launched groups). ``pg=None``: the default group."""

    def __init__(self, pg, owned: bool):
        self.pg, self._owned = pg, owned

    def allgather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * dist.get_world_size(self.pg)
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            # Every rank must be done with the group before any rank tears it down: a rank that
            # exits while a peer is still in a collective aborts in gloo's C++ teardown.
            dist.barrier()
            dist.destroy_process_group()


_HEADER = struct.Struct("!Q")  # payload length, then the pickle


class _SocketTransport(_Transport):
    """A star over socketpairs: rank 0 holds one socket per worker, a worker one to rank 0.

    An all-gather is: each worker sends its pickle to rank 0; rank 0 reads them in rank order and
    forwards every other rank's pickle to each worker (as received: rank 0 pickles only its own
    object). Each message carries the collective's sequence number, so ranks out of step fail. A peer that dies is seen as end-of-file and
    raised as :class:`RuntimeError` naming it; after that the group is broken and rank 0's
    ``close()`` kills and reaps the remaining workers instead of waiting on them.
    """

    def __init__(self, rank: int, world: int, socks: list[socket.socket], pids: list[int] = ()):
        self.rank, self.world = rank, world
        self._socks = list(socks)  # rank 0: worker r at index r - 1; a worker: [rank 0]
        self._pids = list(pids)
        self._broken: str | None = None
        self._seq = 0  # collectives so far, to catch ranks that are out of step

    def _peer(self, i: int) -> str:
        if self.rank != 0:
            return "rank 0"
        return f"rank {i + 1} (pid {self._pids[i]})" if i < len(self._pids) else f"rank {i + 1}"

    def allgather(self, obj) -> list:
        return self._exchange("allgather", obj)

    def _exchange(self, op: str, obj) -> list:
        if self._broken:
            raise RuntimeError(f"process group is broken: {self._broken}")
        self._seq += 1
        step = (self._seq, op)  # every rank must be at the same collective
        try:
            mine = pickle.dumps((step, obj), protocol=pickle.HIGHEST_PROTOCOL)
            if self.rank == 0:
                raw, parts = [mine], [obj]
                for i, s in enumerate(self._socks):
                    raw.append(_recv_msg(s, self._peer(i)))
                    parts.append(self._check(pickle.loads(raw[-1]), step, self._peer(i)))
                for i, s in enumerate(self._socks):  # forward the pickles: no second dumps
                    for r, payload in enumerate(raw):
                        if r != i + 1:  # a worker keeps its own object
                            _send_msg(s, payload, self._peer(i))
                return parts
            _send_msg(self._socks[0], mine, "rank 0")
            # read everything before unpickling, so rank 0 is free to serve the next worker
            raw = [None if r == self.rank else _recv_msg(self._socks[0], "rank 0") for r in range(self.world)]
            return [obj if r == self.rank else
                    self._check(pickle.loads(payload), step, "rank 0" if r == 0 else f"rank {r} (via rank 0)")
                    for r, payload in enumerate(raw)]
        except BaseException as e:  # a stream left mid-message cannot be used again
            self._broken = str(e) or type(e).__name__
            raise

    def _check(self, message, step, peer: str):
        theirs, obj = message
        if theirs != step:
            raise RuntimeError(f"process group: {peer} is out of step (at collective {theirs}, "
                               f"rank {self.rank} at {step})")
        return obj

    def close(self) -> None:
        try:
            if not self._broken:
                self._exchange("close", None)  # nobody leaves while a peer is still in a collective
        finally:
            for s in self._socks:
                s.close()
            self._socks = []
            if self.rank == 0:
                pids, self._pids = self._pids, []
                if self._broken:
                    _kill_and_reap(pids)  # they can no longer agree on anything
                else:
                    for pid in pids:  # they are past the barrier and exiting
                        _reap(pid)


def _send_msg(sock: socket.socket, payload: bytes, peer: str) -> None:
    try:
        sock.sendall(_HEADER.pack(len(payload)))
        sock.sendall(payload)
    except OSError as e:  # EPIPE / ECONNRESET: the peer is gone
        raise RuntimeError(f"process group: {peer} exited during a collective ({e.strerror or e})") from None


def _recv_exact(sock: socket.socket, n: int, peer: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    try:
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise RuntimeError(f"process group: {peer} exited during a collective "
                                   f"(end of file after {got} of {n} bytes)")
            got += k
    except OSError as e:
        raise RuntimeError(f"process group: {peer} exited during a collective ({e.strerror or e})") from None
    return buf


def _recv_msg(sock: socket.socket, peer: str) -> bytearray:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, peer))
    return _recv_exact(sock, n, peer)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # already reaped (SIGCHLD ignored, or someone else waited)
        pass


def _kill_and_reap(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        _reap(pid)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent was already gone before prctl took effect
        os._exit(1)
