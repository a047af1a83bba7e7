"""Data-parallel training under ``torchrun``: process group, batch sharding, metric reduction.

``fit`` calls these; nothing here is needed for one process. Under
``torchrun --nproc_per_node=K -m advx train ...`` every process builds the same model, joins the
process group (gloo on CPU, nccl on GPU), wraps the model in ``DistributedDataParallel`` and
takes its share of every global batch:

* The data order is a ``DistributedSampler`` over the training set with the same seed on every
  rank: at epoch e the sampler permutes the samples with ``seed + e`` and gives rank r the
  positions r, r + K, r + 2K, ... of that permutation. Cut into local batches of B / K, rank r's
  t-th batch holds exactly the rank-r share of global batch t = permutation[t*B : (t+1)*B], so
  K processes see, step by step, the same global batches as one process with batch size B.
* The sampler pads the permutation to a multiple of K with repeated samples; those repeats are
  dropped here, so that no sample counts twice.
* Each rank's loss is the sum of its samples' losses divided by the number of samples in the
  *global* batch, times K (DDP averages the gradients over the K processes): the gradient is the
  global-batch mean whatever the split, also for a last batch that does not divide evenly.

What is not reproduced across process counts: batch-norm statistics (each process normalizes
with the statistics of its own share; use a model without batch norm, or accept the difference)
and dropout masks (drawn from each process's own global RNG).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["Group", "current_group", "init_from_env", "is_main"]


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

    def check_batch_size(self, batch_size: int) -> int:
        """The local batch size; the global one must split evenly across the processes."""
        if batch_size % self.world:
            raise InputError(
                f"batch_size: {batch_size} does not split evenly across {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        return batch_size // self.world

    def batches(
        self, n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True
    ) -> Iterator[tuple[Tensor, int]]:
        """This rank's share of each global batch of epoch ``epoch``: (positions in [0, n), size
        of the global batch). Every rank yields the same number of batches (DDP needs each rank
        at every step); a share may be empty for the last batch."""
        from torch.utils.data import DistributedSampler

        local = self.check_batch_size(batch_size)
        sampler = DistributedSampler(
            range(n),
            num_replicas=self.world,
            rank=self.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
        # the sampler pads to a multiple of world with repeats: padded slot j of this rank is
        # global position rank + j * world; positions >= n are the repeats
        real = (self.rank + torch.arange(order.numel()) * self.world) < n
        steps = -(-n // batch_size)
        for t in range(steps):
            sl = slice(t * local, (t + 1) * local)
            yield order[sl][real[sl]], min(batch_size, n - t * batch_size)

    def shard(self, n: int) -> Tensor:
        """Rows of an n-sample evaluation set that this rank evaluates: every world-th one."""
        return torch.arange(self.rank, n, self.world)

    def sum(self, values: Tensor) -> Tensor:
        """Sum a small tensor of counts over the processes (a no-op for one process)."""
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

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` in DistributedDataParallel when there are several processes, else itself."""
        if self.world == 1:
            return net
        from torch.nn.parallel import DistributedDataParallel

        device = next(net.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)


def current_group() -> Group:
    """The process group ``torch.distributed`` was initialized with, or a group of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Group(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Group()


def is_main() -> bool:
    return current_group().main


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
