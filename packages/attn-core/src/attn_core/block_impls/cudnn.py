"""The cuDNN block path (CUDA): :mod:`attn_core.sdpa_ops` on transposed views of q, k, v, never copies.

Takes fp16/bf16 CUDA blocks with a contiguous head dim that cuDNN's fused attention takes, without
a key padding mask (the math path handles padding) and, when causal, square (top-left and
bottom-right causal alignment then agree).
"""

from __future__ import annotations

import torch

from .. import sdpa_ops

__all__ = ["NAME", "backward", "forward", "unsupported_reasons"]

NAME = "cudnn"


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> list[str]:
    """Why the cuDNN path cannot take this block (empty: it can)."""
    if q.device.type != "cuda":
        return [f"runs on CUDA devices only, got device {q.device}"]
    reasons = []
    if has_padding:
        reasons.append("a key_padding_mask is not supported here (the math path takes it)")
    if is_causal and q.shape[1] != k.shape[1]:
        reasons.append(f"causal blocks must be square here, got Nq={q.shape[1]}, Nk={k.shape[1]}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        reasons.append(f"q and k need a contiguous head dim, got strides {q.stride()} and {k.stride()}")
    return reasons + sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) fp32); key_padding_mask is always None here."""
    out, lse = sdpa_ops.attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal, scale=softmax_scale
    )
    return out.transpose(1, 2), lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in fp32 (the accumulation dtype of fp16/bf16 blocks)."""
    dq, dk, dv = sdpa_ops.attention_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse,
        is_causal=is_causal,
        scale=softmax_scale,
    )
    return dq.transpose(1, 2).float(), dk.transpose(1, 2).float(), dv.transpose(1, 2).float()
