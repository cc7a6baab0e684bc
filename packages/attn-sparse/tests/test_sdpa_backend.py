"""The "sdpa" backend of block_sparse_attention: calls that are dense causal attention (layout=None,
causal, no window that binds) run as one dense causal call.

Checked against the float64 reference (attn_core.reference.dense_attention with the same masks)
for out, dq, dk and dv under the 2x-of-plain-PyTorch rule, on the CPU kernels (and cuDNN on a GPU):
GQA, batches, odd lengths, key padding (with rows that see no key: 0, never NaN), a window too
wide to bind, non-contiguous inputs, one token; then how "auto" picks it and why it declines
(windows that bind, documents, a given layout), and torch.compile.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_sparse import BlockLayout, block_sparse_attention, explain, last_backend

D = 16


def _inputs(batch: int, n: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, heads, D, generator=g).to(dtype)
    k = torch.randn(batch, n, kv_heads, D, generator=g).to(dtype)
    v = torch.randn(batch, n, kv_heads, D, generator=g).to(dtype)
    do = torch.randn(batch, n, heads, D, generator=g).to(dtype)
    return q, k, v, do


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, masks: dict[str, Any]) -> None:
    """masks: block_sparse_attention's mask keywords (key_padding_mask too)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, None, backend="sdpa", **masks)
    assert last_backend() == "sdpa"
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, leaves, do)

    def ref(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _ = reference.dense_attention(*xs, dtype=dt, **masks)
        return (o, *torch.autograd.grad(o, xs, do.to(dt)))

    want = ref(torch.float64)
    base = ref(q.dtype) if q.dtype != torch.float64 else (None,) * 4
    for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), want, base):
        assert torch.isfinite(got).all(), name
        assert_close_to_reference(name, got, r, b)
    pad = masks.get("key_padding_mask")
    if pad is not None:  # padded keys get exactly zero gradient
        assert not grads[1][pad].any() and not grads[2][pad].any()


@pytest.mark.parametrize(
    ("batch", "n", "heads", "kv_heads", "left"),
    [
        (1, 37, 4, 2, None),
        (2, 37, 6, 3, None),  # batch > 1, group 2
        (1, 130, 4, 1, None),  # longer than a tile, group 4
        (1, 41, 2, 2, 40),  # a window as wide as the sequence does not bind
        (1, 41, 2, 2, 1000),
        (1, 1, 2, 1, None),  # one token
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(
    batch: int, n: int, heads: int, kv_heads: int, left: int | None, dtype: torch.dtype
) -> None:
    q, k, v, do = _inputs(batch, n, heads, kv_heads, dtype, seed=n + heads)
    masks: dict[str, Any] = {"is_causal": True}
    if left is not None:
        masks["window_size"] = (left, 0)
    _check(q, k, v, do, masks)


def test_right_side_of_the_window_is_capped_by_causal_and_scale_is_honoured() -> None:
    q, k, v, do = _inputs(1, 50, 4, 2, torch.float64, seed=3)
    _check(q, k, v, do, {"is_causal": True, "window_size": (60, 5), "softmax_scale": 0.3})


@pytest.mark.parametrize("n", [37, 130])
def test_key_padding(n: int) -> None:
    q, k, v, do = _inputs(2, n, 4, 2, torch.float32, seed=n)
    pad = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) < 0.3
    pad[0, :9] = True  # left padding: the first rows of batch row 0 see no key (out 0, not NaN)
    pad[1, -3:] = True  # right padding
    k[pad] = float("nan")  # padded keys' values are never read
    v[pad] = float("nan")
    _check(q, k, v, do, {"is_causal": True, "key_padding_mask": pad})


def test_non_contiguous_inputs() -> None:
    q, k, v, do = _inputs(1, 45, 4, 2, torch.float32, seed=4)
    # (B, H, N, D) storage seen as (B, N, H, D): rows are not contiguous
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    _check(qt, kt, vt, do, {"is_causal": True})


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), group=st.sampled_from([1, 2, 4]), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_random_lengths(n: int, group: int, batch: int, seed: int) -> None:
    q, k, v, do = _inputs(batch, n, 2 * group, 2, torch.float64, seed)
    _check(q, k, v, do, {"is_causal": True})


def test_auto_picks_sdpa_for_causal_and_says_why_not_otherwise() -> None:
    q, k, v, _ = _inputs(1, 64, 4, 2, torch.float32, seed=5)
    assert explain(q, k, v, None, is_causal=True).backend == "sdpa"
    assert explain(q, k, v, None, is_causal=True, window_size=(63, 0)).backend == "sdpa"
    out = block_sparse_attention(q, k, v, None, is_causal=True)
    assert last_backend() == "sdpa" and torch.isfinite(out).all()

    def reasons(layout: BlockLayout | None = None, **masks: Any) -> str:
        return "; ".join(explain(q, k, v, layout, **masks).rejected["sdpa"])

    assert "the Triton kernel runs windows" in reasons(is_causal=True, window_size=(62, 0))
    assert "needs is_causal=True" in reasons(window_size=(20, 20))
    assert "cu_seqlens" in reasons(is_causal=True, cu_seqlens=torch.tensor([0, 10, 64], dtype=torch.int32))
    given_layout = BlockLayout.from_dense(torch.ones(1, 1, 1, dtype=torch.bool), (64, 64))
    assert "a layout was given" in reasons(given_layout, is_causal=True)
    # a pinned backend that cannot take the call raises with its reasons, never falls back
    with pytest.raises(ValueError, match="a layout was given"):
        block_sparse_attention(q, k, v, given_layout, is_causal=True, backend="sdpa")
    with pytest.raises(ValueError, match="as many queries as keys"):
        block_sparse_attention(q, k[:, :32], v[:, :32], None, is_causal=True, backend="sdpa")


def test_torch_compile_matches_eager() -> None:
    q, k, v, do = _inputs(1, 40, 4, 2, torch.float32, seed=6)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q, k, v, None, is_causal=True, backend="sdpa")

    results = []
    # eager first: the layout derived from the masks is then cached, and the compiled call reads it
    # without a lock (fullgraph: a graph break raises)
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves, do)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN attention)")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 128), (4, 4, 64)])
def test_cudnn_matches_float64_reference(padded: bool, heads: int, kv_heads: int, head_dim: int) -> None:
    n = 3001
    g = torch.Generator(device="cuda").manual_seed(heads)
    q, k, v = (
        torch.randn(1, n, h, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        for h in (heads, kv_heads, kv_heads)
    )
    do = torch.randn(1, n, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    masks: dict[str, Any] = {"is_causal": True}
    if padded:
        pad = torch.zeros(1, n, dtype=torch.bool, device="cuda")
        pad[0, :100] = True  # left padding: the first rows see no key
        masks["key_padding_mask"] = pad
    _check(q, k, v, do, masks)
