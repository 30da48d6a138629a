"""Process groups for multi-process merging: torchrun, srun, or an existing process group.

The merge only needs to agree on errors and to gather small dicts, so it uses gloo (works on
CPU nodes and GPU nodes alike) and touches no accelerator.
"""

from __future__ import annotations

import datetime
import os

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

    def __init__(self, rank: int = 0, world: int = 1, pg=None, owned: bool = False):
        self.rank, self.world, self.pg, self._owned = rank, world, pg, owned

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
        if self._owned and dist.is_initialized():
            # Every rank must be done with the group before any rank tears it down: a rank that
            # exits while a peer is still in a collective aborts in gloo's C++ teardown.
            dist.barrier()
            dist.destroy_process_group()
