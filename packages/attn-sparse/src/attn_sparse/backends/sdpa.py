"""The "sdpa" backend: a block-sparse call that is dense causal attention runs as one (cuDNN).

It takes the calls whose tiles are the token masks' own (``layout=None``, so the tiles are the
whole causal triangle) and whose mask is causal with no window that binds (``window_size=(left,
right)`` with left < 0 or left >= N - 1; causal caps right at 0), on one sequence per batch row
(no ``cu_seqlens``, Nq == Nk), with or without key padding. That is dense causal attention: one
call of :mod:`attn_core.sdpa_ops` (cuDNN on CUDA: fp16/bf16, D % 8 == 0, D <= 128; the CPU flash
kernel on the CPU, any float dtype), first in the auto order because it is faster than the Triton
kernel there (H100, N=32K-128K: fwd+bwd 1.24-1.35x, docs/benchmarks/sparse_masks_h100.md).

Windows that bind stay with the Triton kernel. Running them as dense causal calls (chunks of
``left`` tokens: each chunk against its own keys causally, and against the previous chunk's keys
reversed into causal form, merged by LSE) was measured 0.49-0.91x the Triton kernel's
forward+backward on an H100 (docs/benchmarks/window_chunks_h100.md): the reversed copies and the
merges cost more than cuDNN's faster tiles give back.

Key padding (``key_padding_mask`` (B, N), True = padding) is an additive -inf key bias; padded
keys' rows are zeroed first (never read). A row whose keys are all padding outputs 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attn_core import sdpa_ops
from attn_core.blocks import acc_dtype, drop_padded_keys
from attn_core.custom_op import DifferentiableOp

if TYPE_CHECKING:
    from ..layout import BlockLayout
    from ..masks import TokenMask

__all__ = ["NAME", "SUPPORTS_KEY_PADDING_MASK", "block_sparse_attention", "unsupported_reasons"]

NAME = "sdpa"
SUPPORTS_KEY_PADDING_MASK = True


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask
) -> list[str]:
    """Why this call is not dense causal attention (empty list: it is). Launches nothing."""
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])
    n_q, n_k = q.shape[1], k.shape[1]
    if not mask.causal:
        reasons.append("needs is_causal=True (it runs dense causal attention)")
    if mask.cu_seqlens is not None:
        reasons.append("packed documents (cu_seqlens) are not supported")
    if n_q != n_k:
        reasons.append(f"needs as many queries as keys, got Nq={n_q}, Nk={n_k}")
    left, _ = mask.sides()
    if 0 <= left < n_q - 1:
        reasons.append(f"the window (left={left} < N - 1 = {n_q - 1}) masks keys: the Triton kernel runs windows")
    if layout.derived_from != mask.derivation_key(n_q, n_k):
        reasons.append("a layout was given: this backend computes only the token masks (layout=None)")
    return reasons


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, H, D) and lse (B, H, N) of causal attention; bias: (B, N) additive key bias or None."""
    o, lse = sdpa_ops.attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, key_bias=bias
    )
    return o.transpose(1, 2).contiguous(), lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_forward`, (B, N, heads, D) each."""
    dout_t, q_t, k_t, v_t, out_t = (x.transpose(1, 2) for x in (dout, q, k, v, out))
    dq, dk, dv = sdpa_ops.attention_backward(
        dout_t, q_t, k_t, v_t, out_t, lse, is_causal=True, scale=scale, key_bias=bias
    )
    return dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()


def _fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, H, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((B, H, N), dtype=acc_dtype(q.dtype))


DENSE_CAUSAL = DifferentiableOp(
    "attn_sparse::dense_causal",
    inputs=("q", "k", "v"),
    outputs=("out", "lse"),
    args_schema="Tensor? key_bias, float scale",
    forward=_forward,
    backward=_backward,
    encode=lambda bias, scale: (bias, scale),
    decode=lambda bias, scale: (bias, scale),
    fake=_fake,
    second_order_error=(
        "double backward (second-order gradients through create_graph=True) is not supported by the "
        "sdpa backend of block_sparse_attention; use backend='reference'"
    ),
)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    softmax_scale: float,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (B, N, H, D) in q.dtype of causal attention; exact gradients in q, k, v.
    key_padding_mask: (B, N) bool, True = padding key."""
    bias = None
    if key_padding_mask is not None:
        k, v = drop_padded_keys(k, v, key_padding_mask)
        bias = sdpa_ops.key_bias_from_mask(key_padding_mask, q.dtype)
    return DENSE_CAUSAL(q, k, v, bias, float(softmax_scale))
