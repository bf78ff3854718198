"""``torchrun`` support: process group, rank facts, and the few collectives the trainer needs.

Run under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` set) the trainer joins the
process group (NCCL on GPUs, gloo on CPU), wraps the model in DistributedDataParallel,
shards the data with a distributed sampler, and only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: Optional[str] = None) -> DistContext:
    """Join the process group if ``torchrun`` started us; pick this rank's device.

    ``device``: ``None`` = ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"``
    becomes ``cuda:<local_rank>``; anything else is used as given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device == "cuda":
        dev = torch.device(f"cuda:{local_rank}")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device: {dev} does not exist ({torch.cuda.device_count()} GPU(s)); with torchrun "
            f"use at most one process per GPU, or device='cpu' for gloo on CPU"
        )
    initialized_here = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        initialized_here = True
    if dist.is_initialized():
        return DistContext(
            dist.get_rank(), dist.get_world_size(), local_rank, dev, initialized_here
        )
    return DistContext(0, 1, 0, dev, False)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum over ranks (in place; returned for chaining). A no-op with one process."""
    if ctx.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
