"""Cutting a sequence into ring shards and putting it back together.

layout="contiguous": rank r of W holds tokens [r*n, (r+1)*n) with n = N / W (needs N % W == 0).
layout="zigzag": the sequence is cut into 2W chunks of c = N / (2W) tokens and rank r holds chunk r
followed by chunk 2W-1-r (needs N % (2W) == 0). Under a causal mask every rank then has the same
amount of work: an early chunk (little to attend to) paired with a late one (a lot).

Shapes: x (B, N, ...) sharded along ``dim`` (default 1, the sequence dim of (B, N, H, D)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "LAYOUTS",
    "check_layout",
    "check_shard_len",
    "check_sharding",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_world(world_size: object, rank: object | None = None) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def check_sharding(seq_len: int, world_size: int, layout: str) -> int:
    """Validate that a sequence of ``seq_len`` tokens splits into ``world_size`` shards; return the shard length."""
    check_layout(layout)
    _check_world(world_size)
    parts = world_size if layout == "contiguous" else 2 * world_size
    rule = "N % W == 0" if layout == "contiguous" else "N % (2 * W) == 0 (each rank holds two equal chunks)"
    if seq_len <= 0 or seq_len % parts != 0:
        raise ValueError(
            f"sequence length N={seq_len} cannot be sharded over W={world_size} ranks with layout "
            f"{layout!r}: needs N > 0 and {rule}"
        )
    return seq_len // world_size


def check_shard_len(shard_len: int, layout: str) -> None:
    """A rank's shard length must be positive, and even for zigzag (two chunks of equal length)."""
    check_layout(layout)
    if shard_len <= 0 or (layout == "zigzag" and shard_len % 2):
        rule = "a positive even number (two equal chunks)" if layout == "zigzag" else "positive"
        raise ValueError(f"shard length n={shard_len} for layout {layout!r} must be {rule}")


def shard_positions(seq_len: int, world_size: int, rank: int, layout: str = "contiguous") -> torch.Tensor:
    """Global token positions held by ``rank`` (int64, ascending within each chunk)."""
    n = check_sharding(seq_len, world_size, layout)
    _check_world(world_size, rank)
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n)
    c = n // 2
    late = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)])


def _check_tensor(x: object, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor, world_size: int, rank: int, *, layout: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` (B, N, ...) along ``dim`` (a view for contiguous)."""
    d = _check_tensor(x, dim)
    n = check_sharding(x.shape[d], world_size, layout)
    _check_world(world_size, rank)
    if layout == "contiguous":
        return x.narrow(d, rank * n, n)
    c = n // 2
    late = 2 * world_size - 1 - rank
    return torch.cat([x.narrow(d, rank * c, c), x.narrow(d, late * c, c)], dim=d)


def unshard_sequence(shards: Sequence[torch.Tensor], *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from every rank's shard, in rank order."""
    check_layout(layout)
    if isinstance(shards, torch.Tensor) or not isinstance(shards, Sequence) or len(shards) == 0:
        raise ValueError("shards must be a non-empty sequence of tensors, one per rank in rank order")
    d = _check_tensor(shards[0], dim)
    ref = shards[0]
    for i, s in enumerate(shards):
        _check_tensor(s, dim)
        if s.shape != ref.shape or s.dtype != ref.dtype or s.device != ref.device:
            raise ValueError(
                f"every shard must match shard 0 ({tuple(ref.shape)}, {ref.dtype}, {ref.device}); "
                f"shard {i} is ({tuple(s.shape)}, {s.dtype}, {s.device})"
            )
    check_shard_len(ref.shape[d], layout)
    if layout == "contiguous":
        return torch.cat(list(shards), dim=d)
    c = ref.shape[d] // 2
    early = [s.narrow(d, 0, c) for s in shards]
    late = [s.narrow(d, c, c) for s in reversed(shards)]
    return torch.cat(early + late, dim=d)
