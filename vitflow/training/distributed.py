"""torch.distributed for training under torchrun: one process per GPU (nccl), or per CPU share (gloo).

Without torchrun's environment (WORLD_SIZE unset or 1) every helper here is a no-op, so a single
process trains exactly as it always has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that saves and reports."""
    return rank() == 0


def setup() -> torch.device | None:
    """Join torchrun's process group (once) and return this rank's device; None in a single process."""
    if world_size() == 1:
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel, which syncs the trainable parameters only; in a single process, the model itself.

    `static_graph`: every step uses the same parameters, but a trainable one may never be used (DINOv2's
    mask token under `full`); without it DDP fails on the second step waiting for that gradient.
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, static_graph=True)


def shard_batches(n: int, batch_size: int, seed: int, epoch: int) -> tuple[torch.Tensor, ...]:
    """This rank's batches of indices into `n` samples for one epoch.

    A single process shuffles with the global RNG, as always. Under torchrun, torch's DistributedSampler
    deals them: every rank shuffles with (seed, epoch), pads by wrapping round to a multiple of the world
    size and takes every world-th index, so the ranks take the same number of steps.
    """
    if world_size() == 1:
        return torch.randperm(n).split(batch_size)
    sampler = DistributedSampler(range(n), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler)).split(batch_size)


def average(value: float, device: torch.device) -> float:
    """The mean of `value` over the ranks."""
    if world_size() == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / world_size()


def gather_rows(compute: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`compute(rows)`, with each rank computing a contiguous share and all_gather putting them back in order."""
    if world_size() == 1:
        return compute(rows)
    share = math.ceil(len(rows) / world_size())
    mine = compute(rows[torch.arange(rank() * share, (rank() + 1) * share) % len(rows)]).contiguous()
    shares = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(shares, mine)
    return torch.cat(shares)[:len(rows)]
