"""Smoke test of an installed attn-sparse: a layout, a PatternLibrary save/load, a forward+backward.

Run in an environment with only attn-sparse's declared dependencies (``nox -s build`` does);
exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from smoke_check import matches_reference


def main() -> int:
    from attn_core import reference
    from attn_sparse import PatternLibrary, block_sparse_attention, local_window

    N, block = 64, 16
    layout = local_window(N, 16, block_size=block) | local_window(N, 64, block_size=block).tril()
    lib = PatternLibrary()
    lib.add("window", layout, params={"note": "smoke"})
    lib.add_pattern("bb", "bigbird", seq_len=N, window=16, global_tokens=16, random_blocks=1, block_size=block)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "patterns.safetensors"
        try:
            lib.save(path)
            loaded = PatternLibrary.load(path)
        except Exception as exc:  # a missing dependency shows up here (safetensors' torch API)
            print(f"attn-sparse smoke FAILED: PatternLibrary save/load raised {type(exc).__name__}: {exc}")
            return 1
    if loaded != lib or sorted(loaded.names()) != ["bb", "window"]:
        print(f"attn-sparse smoke FAILED: the loaded library differs: {loaded!r} vs {lib!r}")
        return 1
    got_layout = loaded["window"]  # a BlockLayout out of the loaded library
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, N, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, got_layout, is_causal=True, backend="reference")
    expected, _ = reference.block_sparse_attention(q, k, v, got_layout.to_dense(), (block, block), is_causal=True)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(expected, (q, k, v), dout)
    if not matches_reference("attn-sparse smoke FAILED: block_sparse_attention", out, expected, grads, grads_ref):
        return 1
    print("attn-sparse smoke ok: layout, PatternLibrary save/load, block_sparse_attention fwd+bwd == reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
