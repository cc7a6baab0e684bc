"""nn.Module wrappers of :func:`attn_core.dilated_attention`.

- :class:`DilatedAttention`: the functional op with its configuration held by the module
  (q, k, v already split into heads); dropout only in training mode.
- :class:`MultiheadDilatedAttention`: projections + dilated attention + optional MAGNETO
  sub-LayerNorm before the output projection, with the batch-first call convention of
  ``nn.MultiheadAttention`` (returns ``(out, None)``: dilated attention never materialises
  attention weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .api import BACKENDS, BackendChoice, dilated_attention, explain
from .config import DilatedConfig
from .validation import (
    check_bool,
    check_dropout,
    check_factory_kwargs,
    check_positive_float,
    check_positive_int,
    resolve_softmax_scale,
)

__all__ = ["DilatedAttention", "MultiheadDilatedAttention"]


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {('auto', *BACKENDS)}")
    return backend


class DilatedAttention(nn.Module):
    """LongNet dilated attention over pre-split heads (no parameters).

    forward(q (B, N, H, D), k (B, N, Hkv, D), v (B, N, Hkv, D), *, is_causal, key_padding_mask
    (B, N) bool with True = padding, cu_seqlens int32 (num_docs + 1,) for documents packed along N
    with B == 1) -> (B, N, H, D). See :func:`attn_core.dilated_attention`.
    Padded keys' k and v values are never read into the result (NaN there is harmless).
    ``dropout`` is applied to the attention probabilities in training mode only.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        head_mode: str = "all",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # Validate eagerly: a bad config should fail at construction, not at the first forward.
        self.config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout, "dropout")
        self.backend = _check_backend(backend)

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return self.config.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return self.config.dilation_rates

    @property
    def head_mode(self) -> str:
        return self.config.head_mode

    def _kwargs(
        self, is_causal: bool, key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
    ) -> dict[str, Any]:
        return {
            "is_causal": is_causal,
            "key_padding_mask": key_padding_mask,
            "cu_seqlens": cu_seqlens,
            "softmax_scale": self.softmax_scale,
            "dropout_p": self.dropout if self.training else 0.0,
            "head_mode": self.config.head_mode,
            "backend": self.backend,
        }

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        return dilated_attention(
            q, k, v, cfg.segment_lengths, cfg.dilation_rates, **self._kwargs(is_causal, key_padding_mask, cu_seqlens)
        )

    def explain(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> BackendChoice:
        """The backend :meth:`forward` would run on these inputs in the current train/eval mode, and why."""
        cfg = self.config
        return explain(
            q, k, v, cfg.segment_lengths, cfg.dilation_rates, **self._kwargs(is_causal, key_padding_mask, cu_seqlens)
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"head_mode={self.head_mode!r}, dropout={self.dropout}, backend={self.backend!r}"
        )


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention, batch first, ``nn.MultiheadAttention``-like.

    forward(query (B, N, E), key (B, N, E), value (B, N, E), *, is_causal=False,
    key_padding_mask (B, N) bool, True = padding, cu_seqlens int32 (num_docs + 1,) for documents
    packed along N with B == 1) -> (out (B, N, E), None). Projections and the sub-LayerNorm act per
    token, so with cu_seqlens the result equals the module run on each document alone.
    key/value may differ from query but must have the same length N (dilated segments are
    defined on one shared position axis). Padded keys' values are never read into the result.

    Projections: q to ``num_heads`` heads, k and v to ``num_kv_heads`` heads (GQA; default
    ``num_heads``) of size ``embed_dim // num_heads``. With ``layer_norm=True`` (MAGNETO,
    arXiv 2210.06423) a LayerNorm is applied to the attention output before the output
    projection, and v/out projections are initialised with gain ``gamma_init``
    (q/k with gain 1), the sub-LN initialisation that keeps deep stacks stable.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        head_mode: str = "all",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # every option is checked here, before any parameter exists: bad values fail now, by name
        factory = check_factory_kwargs(device, dtype)
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv_heads} (GQA)")
        bias = check_bool("bias", bias)
        layer_norm = check_bool("layer_norm", layer_norm)
        layer_norm_eps = check_positive_float("layer_norm_eps", layer_norm_eps)
        gamma_init = check_positive_float("gamma_init", gamma_init)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = gamma_init
        self.attention = DilatedAttention(
            segment_lengths, dilation_rates, dropout=dropout, head_mode=head_mode, backend=backend
        )
        kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # MAGNETO sub-LN init: xavier-normal, gain 1 for q/k, gain gamma for v and the output.
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise ValueError(f"{name} must have 3 dims (B, N, E) (batch first), got shape {tuple(t.shape)}")
            if t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} last dim must be embed_dim={self.embed_dim}, got shape {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.dtype != self.q_proj.weight.dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(
                    f"{name} dtype {t.dtype} differs from the module's parameters ({self.q_proj.weight.dtype})"
                )
            if t.device != self.q_proj.weight.device:
                raise ValueError(
                    f"{name} is on {t.device} but the module's parameters are on {self.q_proj.weight.device}"
                )
        if key.shape != value.shape:
            raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
        if key.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"key/value (B, N) = {tuple(key.shape[:2])} must equal query's {tuple(query.shape[:2])}: "
                "dilated attention needs one shared sequence axis"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        self._check_inputs(query, key, value)
        B, N, _ = query.shape
        q = self.q_proj(query).view(B, N, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(B, N, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(B, N, self.num_kv_heads, self.head_dim)
        # passed only when given: subclasses may swap in an attention core that takes no cu_seqlens
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        x = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **packed)
        x = x.reshape(B, N, self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"layer_norm={self.norm is not None}, gamma_init={self.gamma_init:g}"
        )
