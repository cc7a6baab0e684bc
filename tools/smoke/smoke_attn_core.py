"""Smoke test of an installed attn-core: dilated attention forward+backward vs attn_core.reference.

Run in an environment with only attn-core's declared dependencies (``nox -s build`` does);
exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import sys

import torch
from smoke_check import matches_reference


def main() -> int:
    from attn_core import dilated_attention, last_backend, reference

    g = torch.Generator().manual_seed(0)
    segments, rates = [4, 8], [1, 2]
    # q (B, N, H, D); k, v (B, N, Hkv, D) with GQA; N not a multiple of the longest segment
    q = torch.randn(2, 21, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 21, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 21, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    out = dilated_attention(q, k, v, segments, rates, is_causal=True)
    backend = last_backend()
    expected, _ = reference.dilated_attention(q, k, v, segments, rates, is_causal=True)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(expected, (q, k, v), dout)
    if not matches_reference(f"attn-core smoke FAILED: dilated_attention ({backend})", out, expected, grads, grads_ref):
        return 1
    print(f"attn-core smoke ok: dilated_attention forward+backward ({backend} backend) == reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
