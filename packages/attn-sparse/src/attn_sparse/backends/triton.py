"""The "triton" backend: our block-sparse Triton kernels (CUDA; CPU under TRITON_INTERPRET=1).

Forward and exact backward over the active tiles only (see :mod:`attn_sparse.kernels`).
Takes fp16/bf16 on CUDA GPUs of compute capability >= 8.0, head dims 16/32/64/128, any layout
block size the layout class allows (powers of two in [16, 1024]: layout.MIN_BLOCK_SIZE..MAX_BLOCK_SIZE). With ``TRITON_INTERPRET=1`` it runs on
CPU tensors in Triton's interpreter (fp16/fp32; bf16 is not supported there): slow, meant for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attn_core.triton_env import interpret_mode, triton_installed

if TYPE_CHECKING:
    from ..layout import BlockLayout
    from ..masks import TokenMask

__all__ = ["NAME", "block_sparse_attention", "unsupported_reasons"]

NAME = "triton"
HEAD_DIMS = (16, 32, 64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
INTERPRET_DTYPES = (torch.float16, torch.float32)


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask
) -> list[str]:
    """Why the Triton kernels cannot take this call (empty list: they can). Launches nothing."""
    reasons: list[str] = []
    if not triton_installed():
        reasons.append("triton is not installed (pip install 'attn-sparse[triton]')")
    if interpret_mode():
        if q.device.type != "cpu":
            return [*reasons, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got device {q.device}"]
        if q.dtype not in INTERPRET_DTYPES:
            reasons.append(f"dtype {q.dtype} is not supported by the Triton interpreter; allowed: float16, float32")
    else:
        # the device first: on another device nothing else matters (no GPU dtype list on a CPU)
        if q.device.type != "cuda":
            return [
                *reasons,
                f"runs on CUDA devices (or on CPU tensors under TRITON_INTERPRET=1), got device {q.device}",
            ]
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            cap = torch.cuda.get_device_capability(q.device)
            reasons.append(f"needs a GPU of compute capability >= 8.0, got {cap[0]}.{cap[1]}")
        if q.dtype not in GPU_DTYPES:
            reasons.append(f"dtype {q.dtype} is not supported on the GPU; allowed: float16, bfloat16")
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]} is not supported; allowed: {HEAD_DIMS}")
    return reasons


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    softmax_scale: float,
) -> torch.Tensor:
    """out (B, Nq, H, D) in q.dtype; differentiable in q, k, v (exact gradients)."""
    from ..kernels import CSR, KernelMask, block_sparse_attention_csr

    Nq, Nk = q.shape[1], k.shape[1]
    left, right = mask.kernel_sides(Nq, Nk)
    docs = mask.document_bounds(Nq)
    # documents are symmetric (the queries that see key j are j's document): one array, both sides
    kmask = KernelMask(mask.banded, left, right, docs, docs)
    return block_sparse_attention_csr(q, k, v, CSR.from_layout(layout), mask=kmask, softmax_scale=softmax_scale)
