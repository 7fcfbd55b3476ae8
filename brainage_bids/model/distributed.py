"""The process layout of a training run under ``torchrun``, and the few collectives it needs.

One process is a world of one, and then nothing here touches ``torch.distributed``. Under
``torchrun`` (``WORLD_SIZE`` > 1) :func:`setup_distributed` sets up the process group (gloo
on the CPU, nccl on CUDA) unless the caller already did; ``batch_size`` is the GLOBAL batch
and :func:`shard` gives each rank a contiguous share of every global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from brainage_bids.model.predict import resolve_device
from brainage_bids.model.train_config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run, and whether it set up the process group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        """Rank 0, the only one that writes files."""
        return self.rank == 0


def setup_distributed(config: TrainConfig) -> DistEnv:
    """Read torchrun's environment; init the process group unless the caller already did."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and config.batch_size < world:
        raise ValueError(f"batch_size ({config.batch_size}) is the global batch and must be at "
                         f"least the number of processes ({world})")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistEnv(rank, world, local_rank, device, owns)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op in one process)."""
    if env.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, back on the CPU (one process: ``tensor``)."""
    if env.world > 1:
        import torch.distributed as dist

        moved = tensor.to(env.device)
        dist.all_reduce(moved)
        return moved.cpu()
    return tensor


def shard(batch: np.ndarray, env: DistEnv) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous share of a global batch, padded (weight 0) to be non-empty."""
    share = np.array_split(batch, env.world)[env.rank]
    weight = np.ones(len(share), dtype=np.float32)
    if len(share) == 0:  # fewer samples than ranks: every rank must still step
        share, weight = batch[:1], np.zeros(1, dtype=np.float32)
    return share, weight

