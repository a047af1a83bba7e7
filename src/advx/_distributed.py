"""torch.distributed, once: join the group torchrun set up, leave it at exit, shard, reduce, gather.

Used alike by the audit (samples split across processes, merged on rank 0), training (DDP) and
the command line. Nothing here is needed for one process: a :class:`Group` of one answers every
call locally.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Group", "current_group", "init_from_env", "local_device"]


@dataclass(frozen=True)
class Group:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> Tensor:
        """This process's rows of an n-row data set: every world-th one, from its rank."""
        return torch.arange(self.rank, n, self.world)

    def sum(self, values: Tensor) -> Tensor:
        """Sum a small tensor over the processes (a copy; itself for one process)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process (picklable objects)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj``, in rank order, on rank 0; None on the other ranks."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, parts, dst=0)
        return parts


def current_group() -> Group:
    """The group ``torch.distributed`` was initialized with, or a group of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Group(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Group()


def init_from_env(device: str | None = None) -> Group:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1): nccl when CUDA is
    there and ``device`` is not ``"cpu"``, else gloo. Returns this process's place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    import torch.distributed as dist

    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device != "cpu"
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        # Joined here, left here: a process that exits with the group still up can abort in
        # gloo's teardown ("terminate called without an active exception", seen with torchrun).
        atexit.register(_leave)
    return current_group()


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | None) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under torchrun with CUDA, else what was asked."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)
