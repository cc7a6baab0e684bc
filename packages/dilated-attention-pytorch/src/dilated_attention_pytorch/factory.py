"""Factories that pick the right attention module for the situation and say why.

kind:
- "dilated": attn_core.DilatedAttention / MultiheadDilatedAttention (one device).
- "ring": attn_ring.RingDilatedAttention / RingMultiheadDilatedAttention (one sequence sharded
  across the ranks of a process group; needs attn-ring and an initialised torch.distributed).
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


def _ring_available() -> tuple[bool, str]:
    if importlib.util.find_spec("attn_ring") is None:
        return False, "attn-ring is not installed (pip install 'dilated-attention-pytorch[ring]')"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False, "torch.distributed is not initialised"
    world = torch.distributed.get_world_size()
    if world < 2:
        return False, f"the default process group has {world} rank; a ring needs at least 2"
    return True, f"torch.distributed is initialised with {world} ranks and attn-ring is installed"


def resolve_kind(kind: str = "auto") -> tuple[str, str]:
    """Return (kind, why) for a requested kind; raises ValueError for unknown or unusable kinds."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ring_ok, ring_why = _ring_available()
    if kind == "auto":
        if ring_ok:
            return "ring", ring_why
        return "dilated", f"single-device dilated attention ({ring_why})"
    if kind == "ring" and importlib.util.find_spec("attn_ring") is None:
        raise ValueError(f"kind='ring' is not available: {ring_why}")
    return kind, "requested explicitly"


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
