"""Factories that pick the right attention module for the situation and say why.

kind:
- "dilated": attn_core.DilatedAttention / MultiheadDilatedAttention (one device).
- "ring": attn_ring.RingDilatedAttention / RingMultiheadDilatedAttention (one sequence sharded
  across the ranks of a process group; needs attn-ring and an initialised torch.distributed,
  ValueError otherwise).
- "auto": "ring" when attn-ring is installed and torch.distributed is initialised with more
  than one rank, else "dilated".
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

import torch
from torch import nn

KINDS = ("auto", "dilated", "ring")


def _ring_unusable() -> str | None:
    """Why kind "ring" cannot run in this process, or None when it can (any initialised world size)."""
    if importlib.util.find_spec("attn_ring") is None:
        return "attn-ring is not installed (pip install 'dilated-attention-pytorch[ring]')"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return (
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every rank "
            "before building ring modules (one process may use a world of size 1)"
        )
    return None


def resolve_kind(kind: str = "auto") -> tuple[str, str]:
    """Return (kind, why) for a requested kind; raises ValueError for unknown or unusable kinds.

    "ring" is unusable without attn-ring or without an initialised torch.distributed (a 1-rank
    world is fine when asked for explicitly); "auto" picks "ring" only with 2 or more ranks.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unusable = _ring_unusable()
    if kind == "ring":
        if unusable is not None:
            raise ValueError(f"kind='ring' is not available: {unusable}")
        return "ring", "requested explicitly"
    if kind == "dilated":
        return "dilated", "requested explicitly"
    if unusable is not None:
        return "dilated", f"single-device dilated attention ({unusable})"
    world = torch.distributed.get_world_size()
    if world < 2:
        return "dilated", f"single-device dilated attention (the default process group has {world} rank)"
    return "ring", f"torch.distributed is initialised with {world} ranks and attn-ring is installed"


def _build(cls: type[nn.Module], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    """cls(*args, **kwargs), refusing options this kind's module does not take (instead of a bare TypeError)."""
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{cls.__name__} (kind={kind!r}) does not take {unknown}; it takes {accepted}. "
            "Pin kind= to the module whose options you pass."
        )
    return cls(*args, **kwargs)


def create_dilated_attention(
    segment_lengths: list[int] | tuple[int, ...],
    dilation_rates: list[int] | tuple[int, ...],
    *,
    kind: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a dilated attention module; forward(q, k, v, *, is_causal=False, key_padding_mask=None).

    q: (B, N, H, D) (for kind "ring": this rank's shard of the sequence). kwargs go to the module.
    """
    resolved, _ = resolve_kind(kind)
    if resolved == "ring":
        cls = importlib.import_module("attn_ring").RingDilatedAttention
    else:
        cls = importlib.import_module("attn_core").DilatedAttention
    return _build(cls, resolved, (segment_lengths, dilation_rates), kwargs)


def create_multihead_dilated_attention(
    embed_dim: int,
    num_heads: int,
    segment_lengths: list[int] | tuple[int, ...],
    dilation_rates: list[int] | tuple[int, ...],
    *,
    kind: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a multi-head dilated attention layer; forward(query, key, value, ...) -> (out, None), batch first."""
    resolved, _ = resolve_kind(kind)
    if resolved == "ring":
        cls = importlib.import_module("attn_ring").RingMultiheadDilatedAttention
    else:
        cls = importlib.import_module("attn_core").MultiheadDilatedAttention
    return _build(cls, resolved, (embed_dim, num_heads, segment_lengths, dilation_rates), kwargs)
