"""Packed documents (cu_seqlens) through the modules, the LongNet layers and LongNetLM, and the
pack_sequences / unpack_sequences helpers.

Each packed run must equal the same module run on each document alone (outputs, input and
parameter gradients; logits and a next-token loss for the LM), checked against float64 runs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from attn_core import (
    DilatedAttention,
    LongNetDecoderLayer,
    LongNetEncoderLayer,
    LongNetLM,
    MultiheadDilatedAttention,
    pack_sequences,
    unpack_sequences,
)
from attn_core.testing import assert_close_to_reference

SEG, RATES = [4, 8], [1, 2]
# 1 token, shorter than a segment, exactly a segment, longer than the largest, empty, odd
LENGTHS = [1, 3, 0, 4, 8, 19, 5, 0]


def _cu(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out


def _docs(cu: torch.Tensor) -> list[tuple[int, int]]:
    offsets = cu.tolist()
    return list(itertools.pairwise(offsets))


def _x(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(module: torch.nn.Module, inputs: list[torch.Tensor], loss: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of loss w.r.t. the inputs, then every parameter (in named_parameters order)."""
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [*inputs, *params])]


def _packed_and_per_document(module, fn, x, dout, cu):
    """(out, grads) of fn(module, x, cu_seqlens) packed and of fn(module, x_doc, None) per document."""
    xp = x.detach().clone().requires_grad_(True)
    out = fn(module, xp, cu)
    grads = _grads(module, [xp], (out * dout).sum())
    xd = x.detach().clone().requires_grad_(True)
    parts = [fn(module, xd[:, s:e], None) for s, e in _docs(cu)]
    ref = torch.cat(parts, dim=1)
    ref_grads = _grads(module, [xd], (ref * dout).sum())
    return out.detach(), grads, ref.detach(), ref_grads


def _mha(module, x, cu):
    out, _ = module(x, x, x, is_causal=True, cu_seqlens=cu)
    return out


@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_multihead_packed_equals_per_document(head_mode, num_kv_heads):
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(
        16, 4, SEG, RATES, num_kv_heads=num_kv_heads, head_mode=head_mode, dtype=torch.float64
    )
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    x, dout = _x(1, N, 16, seed=1), _x(1, N, 16, seed=2)
    out, grads, ref, ref_grads = _packed_and_per_document(mha, _mha, x, dout, cu)
    assert_close_to_reference("out", out, ref)
    names = ["dx", *(n for n, _ in mha.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_to_reference(name, got, want)


def test_multihead_packed_float32_within_twice_plain_pytorch():
    torch.manual_seed(0)
    mha64 = MultiheadDilatedAttention(16, 4, [3, 6, 12], [1, 2, 4], num_kv_heads=2, dtype=torch.float64)
    mha32 = MultiheadDilatedAttention(16, 4, [3, 6, 12], [1, 2, 4], num_kv_heads=2, dtype=torch.float32)
    mha32.load_state_dict({k: v.float() for k, v in mha64.state_dict().items()})
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    x, dout = _x(1, N, 16, seed=3), _x(1, N, 16, seed=4)
    _, _, ref, ref_grads = _packed_and_per_document(mha64, _mha, x, dout, cu)
    out, grads, base, base_grads = _packed_and_per_document(mha32, _mha, x.float(), dout.float(), cu)
    assert out.dtype == torch.float32
    assert_close_to_reference("out", out, ref, base)
    names = ["dx", *(n for n, _ in mha32.named_parameters())]
    for name, got, want, b in zip(names, grads, ref_grads, base_grads):
        assert_close_to_reference(name, got, want, b)


def test_dilated_attention_module_and_explain_take_cu_seqlens():
    attn = DilatedAttention(SEG, RATES)
    cu = _cu([5, 0, 11])
    q, k = _x(1, 16, 4, 8, seed=5), _x(1, 16, 2, 8, seed=6)
    out = attn(q, k, k, cu_seqlens=cu)
    ref = torch.cat([attn(q[:, s:e], k[:, s:e], k[:, s:e]) for s, e in _docs(cu)], dim=1)
    assert_close_to_reference("out", out, ref)
    assert attn.explain(q.float(), k.float(), k.float(), cu_seqlens=cu).backend == "sdpa"
    with pytest.raises(ValueError, match="B == 1"):
        attn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), cu_seqlens=cu)


@pytest.mark.parametrize("layer_cls", [LongNetEncoderLayer, LongNetDecoderLayer])
def test_layers_packed_equal_per_document(layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(16, 4, SEG, RATES, num_kv_heads=2, dropout=0.0, dtype=torch.float64)
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    x, dout = _x(1, N, 16, seed=7), _x(1, N, 16, seed=8)

    def run(module, x, cu):
        return module(x, cu_seqlens=cu)

    out, grads, ref, ref_grads = _packed_and_per_document(layer, run, x, dout, cu)
    assert_close_to_reference("out", out, ref)
    names = ["dx", *(n for n, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_to_reference(name, got, want)


def _next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over packed logits (1, N, V), never across a document boundary."""
    targets = ids[0, 1:].clone()
    last = (cu[1:-1] - 1).long()  # the last token of every document but the final one
    # (empty documents name the previous document's end again, or -1 / N - 1: no target there)
    targets[last[(last >= 0) & (last < targets.numel())]] = -100
    return F.cross_entropy(logits[0, :-1], targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lm_packed_equals_per_document_runs(gradient_checkpointing):
    torch.manual_seed(0)
    lm = LongNetLM(
        50,
        16,
        4,
        2,
        SEG,
        RATES,
        num_kv_heads=2,
        dropout=0.0,
        gradient_checkpointing=gradient_checkpointing,
        dtype=torch.float64,
    ).train()
    g = torch.Generator().manual_seed(9)
    docs = [torch.randint(0, 50, (n,), generator=g) for n in LENGTHS]
    ids, cu = pack_sequences(docs)
    assert ids.shape == (1, sum(LENGTHS)) and cu.dtype == torch.int32
    assert cu.tolist() == _cu(LENGTHS).tolist()

    params = [p for _, p in lm.named_parameters()]
    logits = lm(ids, cu_seqlens=cu)
    loss = _next_token_loss_sum(logits, ids, cu)
    grads = torch.autograd.grad(loss, params)

    per_doc = [lm(d[None]) for d in docs]
    ref_logits = torch.cat(per_doc, dim=1)
    ref_loss = sum(F.cross_entropy(lg[0, :-1], d[1:], reduction="sum") for lg, d in zip(per_doc, docs) if d.numel() > 1)
    ref_grads = torch.autograd.grad(ref_loss, params)

    assert_close_to_reference("logits", logits.detach(), ref_logits.detach())
    assert_close_to_reference("loss", loss.detach(), ref_loss.detach())
    for (name, _), got, want in zip(lm.named_parameters(), grads, ref_grads):
        assert_close_to_reference(name, got, want)
    # the comparison can fail: without cu_seqlens, documents see each other and positions run on
    assert (lm(ids) - ref_logits).abs().max() > 1e-3


def test_lm_positions_restart_at_each_document():
    torch.manual_seed(0)
    lm = LongNetLM(20, 8, 2, 1, SEG, RATES, dropout=0.0, dtype=torch.float64).eval()
    doc = torch.tensor([3, 1, 4, 1, 5])
    ids, cu = pack_sequences([doc, doc])
    logits = lm(ids, cu_seqlens=cu)
    # the same document twice: identical logits, as positions and segments restart
    torch.testing.assert_close(logits[:, :5], logits[:, 5:], rtol=0, atol=1e-12)


def test_lm_refuses_bad_cu_seqlens():
    lm = LongNetLM(20, 8, 2, 1, SEG, RATES, dropout=0.0)
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 5"):
        lm(ids, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="B == 1"):
        lm(torch.zeros(2, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        lm(ids, cu_seqlens=torch.tensor([0, 6]))


# --- pack_sequences / unpack_sequences --------------------------------------------------------


def test_pack_then_unpack_round_trips():
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, 9, (n,), generator=g) for n in [2, 0, 5, 1]]
    ids, cu = pack_sequences(docs)
    assert cu.tolist() == [0, 2, 2, 7, 8]
    back = unpack_sequences(ids, cu)
    assert len(back) == 4 and all(torch.equal(a, b) for a, b in zip(back, docs))
    hidden = torch.randn(1, 8, 3)
    pieces = unpack_sequences(hidden, cu)
    assert [tuple(p.shape) for p in pieces] == [(2, 3), (0, 3), (5, 3), (1, 3)]
    assert torch.equal(torch.cat(pieces), hidden[0])


def test_pack_and_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([])
    with pytest.raises(TypeError, match="list or tuple"):
        pack_sequences(torch.zeros(3))
    with pytest.raises(TypeError, match=r"sequences\[1\].*int"):
        pack_sequences([torch.zeros(2), 3])
    with pytest.raises(ValueError, match=r"sequences\[0\] must be 1-D.*\(2, 2\)"):
        pack_sequences([torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"one dtype and device.*sequences\[1\] is torch.int32"):
        pack_sequences([torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 4"):
        unpack_sequences(torch.zeros(1, 5), torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 dims"):
        unpack_sequences(torch.zeros(5), torch.tensor([0, 5], dtype=torch.int32))
