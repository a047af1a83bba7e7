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

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .._distributed import Group, current_group, init_from_env, local_device
from ..errors import InputError

__all__ = [
    "Group",
    "current_group",
    "init_from_env",
    "local_device",
    "is_main",
    "check_batch_size",
    "batches",
    "wrap",
]


def is_main() -> bool:
    return current_group().main


def check_batch_size(group: Group, batch_size: int) -> int:
    """The local batch size; the global one must split evenly across the processes."""
    if batch_size % group.world:
        raise InputError(
            f"batch_size: {batch_size} does not split evenly across {group.world} processes; "
            f"use a multiple of {group.world}"
        )
    return batch_size // group.world


def batches(
    group: Group, n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[tuple[Tensor, int]]:
    """This rank's share of each global batch of epoch ``epoch``: (positions in [0, n), size
    of the global batch). Every rank yields the same number of batches (DDP needs each rank
    at every step); a share may be empty for the last batch."""
    from torch.utils.data import DistributedSampler

    local = check_batch_size(group, batch_size)
    # the sampler only takes len() of its dataset: a range of the sample ids is enough
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]
        num_replicas=group.world,
        rank=group.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    order = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
    # the sampler pads to a multiple of world with repeats: padded slot j of this rank is
    # global position rank + j * world; positions >= n are the repeats
    real = (group.rank + torch.arange(order.numel()) * group.world) < n
    steps = -(-n // batch_size)
    for t in range(steps):
        sl = slice(t * local, (t + 1) * local)
        yield order[sl][real[sl]], min(batch_size, n - t * batch_size)


def wrap(group: Group, net: nn.Module) -> nn.Module:
    """``net`` in DistributedDataParallel when there are several processes, else itself."""
    if group.world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device = next(net.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)
