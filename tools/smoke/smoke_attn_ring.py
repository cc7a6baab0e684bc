"""Smoke test of an installed attn-ring: ring attention in a single-process gloo world of size 1.

Forward and backward against attn_core.reference (a world of size 1 holds the whole sequence).
Run in an environment with only attn-ring's declared dependencies (``nox -s build`` does);
exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from smoke_check import matches_reference


def main() -> int:
    from attn_core import reference
    from attn_ring import ring_attention

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(2, 12, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
            k = torch.randn(2, 12, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
            v = torch.randn(2, 12, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
            out = ring_attention(q, k, v, is_causal=True, layout="zigzag", timeout_s=60)
            dout = torch.randn(out.shape, dtype=out.dtype, generator=g)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        finally:
            dist.destroy_process_group()
    expected, _ = reference.dense_attention(q, k, v, is_causal=True)
    grads_ref = torch.autograd.grad(expected, (q, k, v), dout)
    if not matches_reference(
        "attn-ring smoke FAILED: ring_attention (gloo, world size 1)", out, expected, grads, grads_ref
    ):
        return 1
    print("attn-ring smoke ok: ring_attention (gloo, world size 1) forward+backward == reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
