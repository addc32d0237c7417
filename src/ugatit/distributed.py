"""Multi-process training on torchrun: process-group set-up and the few collectives the training loop needs.

`torchrun --nproc_per_node N -m ugatit train ...` starts N copies of the command; each reads RANK, WORLD_SIZE and
LOCAL_RANK from its environment. Gradients are averaged by DistributedDataParallel (see `Trainer`); this module
only starts the process group (NCCL on GPUs, gloo on CPUs), checks that every rank runs the same config, and
averages logged numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (a no-op otherwise); each rank gets its own GPU."""
    if not launched_by_torchrun():
        return Dist(), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank), device


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_same_config(info: Dist, settings: dict[str, Any]) -> None:
    """Refuse to train when ranks were started with different settings (they would silently diverge)."""
    if not info.enabled:
        return
    configs: list[Any] = [None] * info.world_size
    dist.all_gather_object(configs, settings)
    for rank, other in enumerate(configs):
        diff = sorted(k for k in other if other[k] != configs[0][k])
        if diff:
            details = ", ".join(f"{k} {configs[0][k]!r} vs {other[k]!r}" for k in diff)
            raise ConfigError(f"rank {rank} was started with other settings than rank 0 ({details})")


def mean_over_ranks(info: Dist, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged numbers over ranks (one small all-reduce, only on logging steps)."""
    return _reduce(info, values, device, dist.ReduceOp.SUM, info.world_size)


def max_over_ranks(info: Dist, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The largest value of each logged number over ranks: the slowest rank's waits hold up every rank."""
    return _reduce(info, values, device, dist.ReduceOp.MAX, 1)


def _reduce(info: Dist, values: dict[str, float], device: torch.device, op: Any, divisor: int) -> dict[str, float]:
    if not info.enabled:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return dict(zip(values, (tensor / divisor).tolist(), strict=True))


def any_rank(info: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one: all ranks must stop at the same step, or collectives hang."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather(info: Dist, value: Any) -> list[Any]:
    if not info.enabled:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast(info: Dist, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
