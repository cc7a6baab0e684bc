"""Checks of the test harness itself: real gloo collectives across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import rank_device


def check_all_reduce(rank: int, world_size: int) -> int:
    t = torch.full((3,), float(rank + 1), device=rank_device())
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
