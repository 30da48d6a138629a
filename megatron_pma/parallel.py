"""Process groups for multi-process merging: torchrun, srun, an existing process group, or
worker processes forked by the merge itself (``--workers N``: no launcher, no second ``import torch``).

The merge only needs to agree on errors and to gather small dicts, so it uses gloo (works on
CPU nodes and GPU nodes alike) and touches no accelerator.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal

import torch.distributed as dist


def _env_rank_world() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # srun without torchrun: one task per process
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


class Group:
    """rank / world plus the two collectives the merge needs; a no-op for one process."""

    def __init__(self, rank: int = 0, world: int = 1, pg=None, owned: bool = False,
                 children: tuple[int, ...] = ()):
        self.rank, self.world, self.pg, self._owned = rank, world, pg, owned
        self._children = children  # pids of forked workers (rank 0 of a forked group only)
        self.forked_worker = False  # True in a forked worker: close() ends the process

    @classmethod
    def from_env(cls) -> "Group":
        if dist.is_available() and dist.is_initialized():
            # A CPU-capable side group, so collectives work even when the default one is nccl.
            pg = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
            return cls(dist.get_rank(), dist.get_world_size(), pg)
        rw = _env_rank_world()
        if rw is None or rw[1] <= 1:
            return cls()
        rank, world = rw
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, None, owned=True)

    @classmethod
    def forked(cls, workers: int) -> "Group":
        """This process (rank 0) and ``workers - 1`` forked copies of it as one gloo group.

        Every process returns from here and runs the same code; a forked worker's ``close()``
        ends it. Workers are forked before any thread or store exists (fork copies only the
        calling thread) and die with their parent, so a killed merge leaves no writer behind.
        """
        if dist.is_initialized() or _env_rank_world() is not None:
            raise RuntimeError("--workers cannot be combined with torchrun/srun or an initialised process group")
        pipes, children, rank, parent = [], [], 0, os.getpid()
        for r in range(1, workers):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                rank = r
                os.close(write_end)
                _die_with_parent(parent)
                port = int(os.read(read_end, 32).decode() or 0)
                os.close(read_end)
                break
            os.close(read_end)
            pipes.append(write_end)
            children.append(pid)
        if rank == 0:  # the store's server thread starts only after every fork
            store = dist.TCPStore("127.0.0.1", 0, workers, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(minutes=5))
            for fd in pipes:
                os.write(fd, str(store.port).encode())
                os.close(fd)
        else:
            if not port:
                os._exit(1)  # the parent died before telling us where to connect
            store = dist.TCPStore("127.0.0.1", port, workers, is_master=False,
                                  timeout=datetime.timedelta(minutes=5))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=workers,
                                timeout=datetime.timedelta(minutes=30))
        group = cls(rank, workers, None, owned=True, children=tuple(children))
        group.forked_worker = rank > 0
        return group

    def first_error(self, error: str | None) -> str | None:
        """Every rank learns the first (lowest-rank) error, so all fail or all succeed."""
        if self.world == 1:
            return error
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.pg)
        return next((e for e in errors if e), None)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        objs = [None] * self.world
        dist.all_gather_object(objs, obj if self.rank == 0 else None, group=self.pg)
        return objs[0]

    def gather_dicts(self, d: dict) -> dict:
        if self.world == 1:
            return d
        parts = [None] * self.world
        dist.all_gather_object(parts, d, group=self.pg)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged

    def close(self) -> None:
        try:
            if self._owned and dist.is_initialized():
                # Every rank must be done with the group before any rank tears it down: a rank that
                # exits while a peer is still in a collective aborts in gloo's C++ teardown.
                dist.barrier()
                dist.destroy_process_group()
        finally:
            if self.forked_worker:
                os._exit(0)  # the parent reports the agreed result; never run the caller's code twice
        for pid in self._children:
            os.waitpid(pid, 0)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent was already gone before prctl took effect
        os._exit(1)
