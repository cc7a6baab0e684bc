"""The "triton" backend through the public API: BlockLayout patterns, explainable choice, reasons.

Runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernels load).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from attn_core.reference import block_sparse_attention as reference_attention
from attn_core.testing import assert_close_to_reference
from attn_sparse import BlockLayout, bigbird, block_sparse_attention, causal, explain, last_backend, local_window
from attn_sparse.backends import triton as triton_backend
from attn_sparse.masks import TokenMask


def _qkv(B: int, N: int, H: int, Hkv: int, D: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, N, Hkv, D, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, N, H, D, generator=g).to(dtype)
    return q, k, v, do


def _check(
    layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal_: bool
) -> None:
    out = block_sparse_attention(q, k, v, layout, is_causal=causal_, backend="triton")
    assert last_backend() == "triton"
    grads = torch.autograd.grad(out, (q, k, v), do)

    def ref(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, _ = reference_attention(qr, kr, vr, layout.to_dense(), layout.block_size, is_causal=causal_, dtype=dt)
        return (o.detach(), *torch.autograd.grad(o, (qr, kr, vr), do.to(dt)))

    for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref(torch.float64), ref(q.dtype)):
        assert_close_to_reference(name, got, r, b)


def test_per_head_bigbird_gqa_fp16() -> None:
    # per-head random blocks (num_heads=4), 2 kv heads, N=72 with 16-blocks: partial last block
    N, H = 72, 4
    layout = bigbird(N, 8, 16, 1, seed=3, num_heads=H, block_size=16)
    assert layout.num_heads == H
    _check(layout, *_qkv(2, N, H, 2, 16, torch.float16, seed=1), causal_=False)


def test_causal_window_fp32_rectangular_blocks() -> None:
    N = 60
    layout = local_window(N, 20, block_size=(32, 16)) & causal(N, block_size=(32, 16))
    _check(layout, *_qkv(1, N, 2, 1, 32, torch.float32, seed=2), causal_=True)


def test_auto_picks_triton_in_interpreter_and_explains() -> None:
    q, k, v, _ = _qkv(1, 32, 2, 2, 16, torch.float32, seed=3)
    layout = local_window(32, 16, block_size=16)
    choice = explain(q, k, v, layout)
    assert choice.backend == "triton"
    assert "triton" not in choice.rejected
    # float64 is not a kernel dtype: auto falls through, and the reason says why
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    choice64 = explain(q64, k64, v64, layout)
    assert choice64.backend != "triton"
    assert any("float64" in r for r in choice64.rejected["triton"])


def test_reasons_name_the_problem_and_pinning_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = local_window(32, 16, block_size=16)
    q, k, v, _ = _qkv(1, 32, 2, 2, 24, torch.float16, seed=4)
    reasons = triton_backend.unsupported_reasons(q, k, v, layout, TokenMask.causal_only(False))
    assert any("head dim 24" in r for r in reasons)
    with pytest.raises(ValueError, match="head dim 24"):
        block_sparse_attention(q, k, v, layout, backend="triton")
    qb = torch.randn(1, 32, 2, 16, dtype=torch.bfloat16)
    assert any("bfloat16" in r for r in triton_backend.unsupported_reasons(qb, qb, qb, layout, False))
    # without the interpreter, CPU tensors are refused with a reason naming the device
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q16 = torch.randn(1, 32, 2, 16, dtype=torch.float16)
    cpu_reasons = triton_backend.unsupported_reasons(q16, q16, q16, layout, False)
    assert any("CUDA" in r and "cpu" in r for r in cpu_reasons)


def test_empty_layout_rows_are_zero_not_nan() -> None:
    N = 48
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 2, 1] = True  # only the last query block sees anything
    layout = BlockLayout.from_dense(mask, block_size=16)
    q, k, v, do = _qkv(1, N, 2, 1, 16, torch.float32, seed=5)
    out = block_sparse_attention(q, k, v, layout, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.isfinite(out).all() and (out[:, :32] == 0).all()
    assert (dq[:, :32] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    _check(layout, q, k, v, do, causal_=False)
