"""LongNet layers and LongNetLM: causality, padding, checkpointing, weight tying, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn_core import LongNetDecoderLayer, LongNetEncoderLayer, LongNetLM, magneto_gamma

SEG, RATES = [4, 8], [1, 2]


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_decoder_layer_is_causal_and_encoder_is_not():
    torch.manual_seed(0)
    dec = LongNetDecoderLayer(16, 4, SEG, RATES, dropout=0.0, backend="reference").eval()
    enc = LongNetEncoderLayer(16, 4, SEG, RATES, dropout=0.0, backend="reference").eval()
    x = _x(2, 12, 16, seed=1)
    y = x.clone()
    y[:, 6:] += _x(2, 6, 16, seed=9)  # change the future from position 6 on (not a constant: LayerNorm removes that)
    d_x, d_y = dec(x), dec(y)
    assert torch.equal(d_x[:, :6], d_y[:, :6]), "decoder output before position 6 saw the future"
    assert not torch.allclose(d_x[:, 6:], d_y[:, 6:])
    e_x, e_y = enc(x), enc(y)
    assert not torch.allclose(e_x[:, 4:6], e_y[:, 4:6]), "encoder should see later keys of its segment"
    assert torch.equal(enc(x, is_causal=True)[:, :6], enc(y, is_causal=True)[:, :6])


def test_encoder_layer_padding_mask_blocks_padded_keys():
    torch.manual_seed(0)
    enc = LongNetEncoderLayer(16, 4, SEG, RATES, num_kv_heads=2, dropout=0.0, backend="reference").eval()
    x = _x(1, 10, 16, seed=2)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 8:] = True
    y = x.clone()
    y[0, 8:] = 100.0  # padded positions: their content must not reach the others
    a = enc(x, src_key_padding_mask=mask)
    b = enc(y, src_key_padding_mask=mask)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert torch.isfinite(a).all()


def test_layer_shapes_and_subln():
    layer = LongNetEncoderLayer(24, 4, SEG, RATES, dim_feedforward=40, activation="relu")
    assert layer.linear1.weight.shape == (40, 24) and layer.ffn_norm.normalized_shape == (40,)
    assert layer.self_attn.norm is not None  # MAGNETO sub-LN in the attention
    assert layer(_x(3, 5, 24)).shape == (3, 5, 24)


def test_magneto_gamma():
    assert magneto_gamma(6) == pytest.approx(math.sqrt(math.log(12)))
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        magneto_gamma(0)


def _lm(**kw):
    torch.manual_seed(0)
    args = {"dropout": 0.0, "backend": "reference"}
    args.update(kw)
    return LongNetLM(11, 16, 4, 2, SEG, RATES, **args)


def test_lm_shapes_causality_and_padding():
    lm = _lm(num_kv_heads=2).eval()
    ids = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(3))
    logits = lm(ids)
    assert logits.shape == (2, 13, 11) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 11
    assert torch.equal(lm(changed)[:, :9], logits[:, :9]), "LM logits before position 9 depend on later tokens"
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[:, 0] = True  # every query still sees itself except position 0, which sees nothing: output must stay finite
    assert torch.isfinite(lm(ids, key_padding_mask=mask)).all()
    assert lm(ids[:, :1]).shape == (2, 1, 11)


def test_tied_and_untied_heads():
    tied, untied = _lm(), _lm(tie_weights=False)
    assert tied.lm_head is None and untied.lm_head is not None
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 11 * 16
    ids = torch.randint(0, 11, (1, 6))
    F.cross_entropy(tied(ids).flatten(0, 1), ids.flatten()).backward()
    # the tied head's gradient reaches the embedding through both uses
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("dropout", "attention_dropout"), [(0.0, 0.0), (0.2, 0.0), (0.1, 0.3)])
def test_gradient_checkpointing_gives_identical_gradients(dropout, attention_dropout):
    plain = _lm(dropout=dropout, attention_dropout=attention_dropout).train()
    ckpt = _lm(dropout=dropout, attention_dropout=attention_dropout, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(4))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


@pytest.fixture
def one_thread():
    # 120 steps of tiny ops: intra-op threads only add sync cost (and stall on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_lm_learns_a_copy_task():
    # Each sequence is 5 random tokens repeated: predicting token p+1 (p >= 5) means reading
    # position p-4, which the rate-4 group reaches (same residue mod 4, same 16-segment).
    # After a few steps the loss on the copied half must fall far below its start (ln 8 ~ 2.08).
    torch.manual_seed(0)
    lm = LongNetLM(8, 32, 4, 1, [4, 8, 16], [1, 2, 4], dropout=0.0, backend="reference")
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):
        half = torch.randint(0, 8, (16, 5), generator=g)
        seq = torch.cat([half, half], dim=1)
        logits = lm(seq[:, :-1])
        loss = F.cross_entropy(logits[:, 4:].flatten(0, 1), seq[:, 5:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.5, f"copy-task loss did not fall enough: {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lm_in_other_dtypes(dtype):
    lm = _lm(dtype=dtype, num_kv_heads=1)
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(5))
    logits = lm(ids)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in lm.parameters())


def test_sinusoidal_positions_are_exact_at_long_range():
    from attn_core.longnet import sinusoidal_positions

    pe = sinusoidal_positions(5, 6, device=torch.device("cpu"), dtype=torch.float32)
    assert pe.shape == (5, 6)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    far = sinusoidal_positions(1_000_001, 4, device=torch.device("cpu"), dtype=torch.float32)[-1]
    expected = torch.tensor([math.sin(1e6), math.cos(1e6), math.sin(1e6 / 100), math.cos(1e6 / 100)])
    assert torch.allclose(far, expected, atol=1e-6)
    assert sinusoidal_positions(3, 5, device=torch.device("cpu"), dtype=torch.float32).shape == (3, 5)  # odd dim


def test_attention_dropout_reaches_the_attention_and_residual_dropout_does_not():
    lm = _lm(dropout=0.0, attention_dropout=0.5, backend="auto")
    assert lm.layers[0].self_attn.attention.dropout == 0.5
    assert lm.layers[0].dropout.p == 0.0
    lm2 = _lm(dropout=0.3, backend="auto")
    assert lm2.layers[0].self_attn.attention.dropout == 0.0 and lm2.layers[0].dropout.p == 0.3
    ids = torch.randint(0, 11, (1, 8))
    lm.eval()
    assert torch.equal(lm(ids), lm(ids))
    lm.train()
    torch.manual_seed(0)
    a = lm(ids)
    torch.manual_seed(1)
    assert not torch.allclose(a, lm(ids))
