"""The float64 references against independent brute-force constructions of the same semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn_core import reference
from attn_core.config import DilatedConfig


def _rand(B: int, N: int, H: int, D: int, Hkv: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    return q, k, v


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: list[int], scale: float):
    """out, lse of one query vector over the given key positions (a list, repeats allowed)."""
    if not keys:
        return torch.zeros_like(q), float("-inf")
    s = torch.stack([q @ k[j] for j in keys]) * scale
    lse = torch.logsumexp(s, 0)
    p = torch.exp(s - lse)
    return (p[:, None] * torch.stack([v[j] for j in keys])).sum(0), float(lse)


def _brute_force_dilated(q, k, v, cfg: DilatedConfig, *, is_causal: bool, pad: torch.Tensor | None):
    """Per group and head: segment, select s + o + t*r, attend; then merge groups by their lse."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    scale = 1 / math.sqrt(D)
    out = torch.zeros_like(q)
    for b in range(B):
        for j in range(H):
            kv = j // (H // Hkv)
            for p in range(N):
                parts = []
                for g, (w, r) in enumerate(zip(cfg.segment_lengths, cfg.dilation_rates)):
                    if j not in cfg.heads_for_group(g, H):
                        continue
                    s = (p // w) * w
                    o = j % r
                    selected = list(range(s + o, min(s + w, N), r))
                    if p not in selected:
                        continue
                    keys = [t for t in selected if (not is_causal or t <= p) and (pad is None or not pad[b, t])]
                    parts.append(_softmax_rows(q[b, p, j], k[b, :, kv], v[b, :, kv], keys, scale))
                finite = [(o_, l_) for o_, l_ in parts if l_ != float("-inf")]
                if finite:
                    L = torch.logsumexp(torch.tensor([l_ for _, l_ in finite], dtype=torch.float64), 0)
                    out[b, p, j] = sum(math.exp(l_ - L) * o_ for o_, l_ in finite)
    return out


@pytest.mark.parametrize(
    ("N", "H", "Hkv", "segs", "rates", "mode", "causal", "padded"),
    [
        (13, 3, 3, (4, 8), (1, 2), "all", False, False),
        (13, 3, 1, (4, 8), (1, 2), "all", True, False),
        (11, 5, 5, (2, 6, 12), (1, 2, 3), "split", False, True),
        (9, 4, 2, (3, 9), (1, 3), "split", True, True),
        (1, 2, 2, (4,), (2,), "all", False, False),
    ],
)
def test_dilated_reference_matches_brute_force(N, H, Hkv, segs, rates, mode, causal, padded) -> None:
    q, k, v = _rand(2, N, H, 4, Hkv, seed=N * 7 + H)
    pad = None
    if padded:
        pad = torch.zeros(2, N, dtype=torch.bool)
        pad[0, 1::3] = True
        pad[1, :] = True  # a fully padded sequence: every row empty
    cfg = DilatedConfig(segs, rates, mode)
    expected = _brute_force_dilated(q, k, v, cfg, is_causal=causal, pad=pad)
    out, lse = reference.dilated_attention(q, k, v, segs, rates, is_causal=causal, key_padding_mask=pad, head_mode=mode)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(lse)  # (B, H, N): rows with no key output exactly 0
    assert torch.all(out.transpose(1, 2)[empty] == 0)
    if padded:
        assert torch.all(empty[1])


def test_dense_reference_matches_sdpa_float64() -> None:
    q, k, v = _rand(2, 7, 4, 8, Hkv=2)
    for causal in (False, True):
        out, lse = reference.dense_attention(q, k, v, is_causal=causal)
        kr, vr = (t.repeat_interleave(2, dim=2) for t in (k, v))
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
        s = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(8)
        if causal:
            s = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_dense_reference_padding_gives_zero_rows_and_finite_grads() -> None:
    q, k, v = (t.requires_grad_() for t in _rand(2, 5, 2, 4))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    out, lse = reference.dense_attention(q, k, v, key_padding_mask=pad)
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0)


def test_weights_reference_is_differentiable_in_its_weights() -> None:
    # learned multiplicities with zeros (unattended keys): gradients are finite, 0 at the zeros,
    # and match a finite difference where the weights are positive
    q, k, v = _rand(1, 6, 2, 4)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(1, 2, 6, 6, generator=g, dtype=torch.float64) + 0.1
    w = (w * (torch.rand(1, 2, 6, 6, generator=g) > 0.4)).requires_grad_()
    w.data[..., 0] = 0.5  # every query attends at least one key
    out, _ = reference.attention_from_weights(q, k, v, w)
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert torch.isfinite(grad).all() and torch.all(grad[w == 0] == 0)
    assert torch.autograd.gradcheck(
        lambda x: reference.attention_from_weights(q, k, v, torch.where(w > 0, x, 0.0))[0],
        (w.detach().clone().requires_grad_(),),
    )


def test_block_sparse_reference_matches_dense_with_token_mask() -> None:
    q, k, v = _rand(1, 10, 2, 4, seed=3)
    block_mask = torch.tensor([[[1, 0, 1], [0, 0, 0], [1, 1, 1]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    for causal in (False, True):
        out, lse = reference.block_sparse_attention(q, k, v, block_mask, (4, 4), is_causal=causal)
        tok = torch.zeros(2, 10, 10, dtype=torch.bool)
        for h in range(2):
            for i in range(10):
                for j in range(10):
                    tok[h, i, j] = bool(block_mask[h, i // 4, j // 4]) and (not causal or j <= i)
        dense_out, dense_lse = reference.dense_attention(q, k, v, attn_mask=tok[None])
        torch.testing.assert_close(out, dense_out)
        torch.testing.assert_close(lse, dense_lse)
        assert torch.all(out[:, 4:8, 0] == 0)  # head 0: query block 1 has no active tile
        assert torch.all(torch.isinf(lse[:, 0, 4:8]))


def test_low_precision_baseline_runs_in_that_dtype() -> None:
    q, k, v = (t.to(torch.float16) for t in _rand(1, 6, 2, 8))
    out, lse = reference.dense_attention(q, k, v, dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref, _ = reference.dense_attention(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5


def test_references_with_no_keys_give_empty_rows() -> None:
    q, k, v = _rand(1, 3, 2, 4)
    out, lse = reference.dense_attention(q, k[:, :0], v[:, :0])
    assert out.shape == (1, 3, 2, 4)
    assert torch.all(out == 0)
    assert torch.all(torch.isinf(lse))
    out0, lse0 = reference.dilated_attention(q[:, :0], k[:, :0], v[:, :0], [4], [1])
    assert out0.shape == (1, 0, 2, 4)
    assert lse0.shape == (1, 2, 0)
