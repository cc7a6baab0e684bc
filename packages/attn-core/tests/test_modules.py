"""DilatedAttention and MultiheadDilatedAttention against manual compositions and the float64 reference."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from attn_core import DilatedAttention, MultiheadDilatedAttention, dilated_attention, explain, last_backend, reference
from attn_core.testing import assert_close_to_reference

SEG, RATES = [4, 8], [1, 2]


def _x(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("head_mode", ["all", "split"])
def test_dilated_attention_module_equals_functional(head_mode):
    q, k, v = _x(2, 11, 4, 8, seed=1), _x(2, 11, 2, 8, seed=2), _x(2, 11, 2, 8, seed=3)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    mod = DilatedAttention(SEG, RATES, softmax_scale=0.3, head_mode=head_mode, backend="reference")
    out = mod(q, k, v, is_causal=True, key_padding_mask=mask)
    ref = dilated_attention(
        q,
        k,
        v,
        SEG,
        RATES,
        is_causal=True,
        key_padding_mask=mask,
        softmax_scale=0.3,
        head_mode=head_mode,
        backend="reference",
    )
    assert torch.equal(out, ref)
    assert mod.segment_lengths == (4, 8) and mod.dilation_rates == (1, 2) and mod.head_mode == head_mode
    assert "segment_lengths=[4, 8]" in repr(mod)
    assert list(mod.parameters()) == []


def test_dilated_attention_dropout_only_in_training():
    q, k, v = _x(1, 8, 2, 4, seed=1), _x(1, 8, 2, 4, seed=2), _x(1, 8, 2, 4, seed=3)
    mod = DilatedAttention(SEG, RATES, dropout=0.5, backend="reference")
    clean = dilated_attention(q, k, v, SEG, RATES, backend="reference")
    mod.eval()
    assert torch.equal(mod(q, k, v), clean)
    mod.train()
    torch.manual_seed(0)
    dropped = mod(q, k, v)
    assert not torch.allclose(dropped, clean)
    torch.manual_seed(0)
    assert torch.equal(mod(q, k, v), dropped)


def _manual_mha(m: MultiheadDilatedAttention, query, key, value, **kw):
    """The module's math spelled out with dilated_attention and plain torch ops."""
    B, N, E = query.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = F.linear(query, m.q_proj.weight, m.q_proj.bias).reshape(B, N, H, D)
    k = F.linear(key, m.k_proj.weight, m.k_proj.bias).reshape(B, N, Hkv, D)
    v = F.linear(value, m.v_proj.weight, m.v_proj.bias).reshape(B, N, Hkv, D)
    x = dilated_attention(q, k, v, SEG, RATES, backend="reference", **kw).reshape(B, N, E)
    if m.norm is not None:
        x = F.layer_norm(x, (E,), m.norm.weight, m.norm.bias, m.norm.eps)
    return F.linear(x, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_matches_manual_composition(layer_norm, num_kv_heads, bias):
    torch.manual_seed(0)
    m = MultiheadDilatedAttention(
        32,
        4,
        SEG,
        RATES,
        num_kv_heads=num_kv_heads,
        layer_norm=layer_norm,
        bias=bias,
        backend="reference",
        dtype=torch.float64,
    )
    if bias:  # non-zero biases so a mixed-up bias would show
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            torch.nn.init.normal_(lin.bias)
    query, key, value = _x(2, 13, 32, seed=4), _x(2, 13, 32, seed=5), _x(2, 13, 32, seed=6)  # key != query
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, :5] = True
    out, weights = m(query, key, value, is_causal=True, key_padding_mask=mask)
    assert weights is None and out.shape == (2, 13, 32) and out.dtype == torch.float64
    expected = _manual_mha(m, query, key, value, is_causal=True, key_padding_mask=mask)
    assert_close_to_reference("mha out", out, expected)
    assert m.k_proj.weight.shape == ((num_kv_heads or 4) * 8, 32)
    assert (m.norm is not None) == layer_norm
    if not bias:
        assert all(lin.bias is None for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))


def test_multihead_against_float64_dense_reference_with_grads():
    # Independent of dilated_attention: projections in float64, attention by the dense-masked reference.
    torch.manual_seed(1)
    m = MultiheadDilatedAttention(16, 4, SEG, RATES, num_kv_heads=2, backend="reference")  # float32 module
    x = _x(2, 10, 16, seed=7, dtype=torch.float32).requires_grad_(True)
    out, _ = m(x, x, x, is_causal=True)
    out.square().sum().backward()

    params = {n: p.detach().double().requires_grad_(True) for n, p in m.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    q = F.linear(x64, params["q_proj.weight"], params["q_proj.bias"]).reshape(2, 10, 4, 4)
    k = F.linear(x64, params["k_proj.weight"], params["k_proj.bias"]).reshape(2, 10, 2, 4)
    v = F.linear(x64, params["v_proj.weight"], params["v_proj.bias"]).reshape(2, 10, 2, 4)
    a, _ = reference.dilated_attention(q, k, v, SEG, RATES, is_causal=True)
    a = F.layer_norm(a.reshape(2, 10, 16), (16,), params["norm.weight"], params["norm.bias"], m.norm.eps)
    ref = F.linear(a, params["out_proj.weight"], params["out_proj.bias"])
    ref.square().sum().backward()
    # float32 result vs float64: loose absolute bound relative to magnitude (composition of many ops)
    assert torch.allclose(out.detach().double(), ref.detach(), atol=1e-4 * float(ref.detach().abs().max()), rtol=0)
    # softmax ignores a per-row constant, so the key bias (it adds q . b_k to every score of a row)
    # has an exactly zero gradient: its float32 value is rounding noise of sums as large as the
    # key weight's gradient terms, so each bias is compared on the scale of its layer's weight gradient
    assert float(params["k_proj.bias"].grad.abs().max()) < 1e-12
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        g64 = params[n].grad
        scale = float(g64.abs().max())
        if n.endswith(".bias"):
            scale = max(scale, float(params[n.removesuffix(".bias") + ".weight"].grad.abs().max()))
        assert torch.allclose(p.grad.double(), g64, atol=1e-4 * scale, rtol=0), n
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-4 * float(x64.grad.abs().max()), rtol=0)


def test_state_dict_round_trip():
    torch.manual_seed(2)
    a = MultiheadDilatedAttention(16, 4, SEG, RATES, num_kv_heads=2, backend="reference")
    torch.manual_seed(3)
    b = MultiheadDilatedAttention(16, 4, SEG, RATES, num_kv_heads=2, backend="reference")
    x = _x(1, 9, 16, seed=8, dtype=torch.float32)
    assert not torch.allclose(a(x, x, x)[0], b(x, x, x)[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    assert set(a.state_dict()) == {
        f"{n}.{p}" for n in ("q_proj", "k_proj", "v_proj", "out_proj", "norm") for p in ("weight", "bias")
    }


def test_magneto_gain_scales_value_and_output_projections():
    torch.manual_seed(4)
    m1 = MultiheadDilatedAttention(64, 4, SEG, RATES, gamma_init=1.0)
    torch.manual_seed(4)
    m3 = MultiheadDilatedAttention(64, 4, SEG, RATES, gamma_init=3.0)
    assert torch.equal(m1.q_proj.weight, m3.q_proj.weight)
    ratio = m3.out_proj.weight.detach().std() / m1.out_proj.weight.detach().std()
    assert 2.5 < float(ratio) < 3.5


def test_dropout_in_module_training_only():
    torch.manual_seed(5)
    m = MultiheadDilatedAttention(16, 4, SEG, RATES, dropout=0.4, backend="reference")
    x = _x(1, 8, 16, seed=9, dtype=torch.float32)
    m.eval()
    e1, e2 = m(x, x, x)[0], m(x, x, x)[0]
    assert torch.equal(e1, e2)
    m.train()
    torch.manual_seed(0)
    t1 = m(x, x, x)[0]
    assert not torch.allclose(t1, e1)


def test_dilated_attention_module_explains_what_forward_runs():
    q, k, v = _x(1, 8, 2, 4, seed=1), _x(1, 8, 2, 4, seed=2), _x(1, 8, 2, 4, seed=3)
    mod = DilatedAttention(SEG, RATES, dropout=0.5, head_mode="split")
    for training in (True, False):
        mod.train(training)
        choice = mod.explain(q, k, v, is_causal=True)
        expected = explain(q, k, v, SEG, RATES, is_causal=True, dropout_p=0.5 if training else 0.0, head_mode="split")
        assert choice == expected
        mod(q, k, v, is_causal=True)
        assert last_backend() == choice.backend


def test_multihead_input_dtype_must_match_parameters() -> None:
    layer = MultiheadDilatedAttention(16, 2, [4], [1])
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="differs from the module's parameters"):
        layer(x, x, x)
