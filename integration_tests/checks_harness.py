"""Checks of the test harness itself: real gloo collectives across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _device() -> torch.device:
    # Under NCCL (run_nccl.py) the CUDA device is set; under gloo the ranks use the CPU.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_all_reduce(rank: int, world_size: int) -> int:
    t = torch.full((3,), float(rank + 1), device=_device())
    dist.all_reduce(t)
    expected = world_size * (world_size + 1) / 2
    if not torch.all(t == expected):
        raise AssertionError(f"rank {rank}: all_reduce gave {t.tolist()}, expected {expected}")
    return rank


def fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return rank


NCCL_CHECKS = [check_all_reduce]
