"""The varlen primitives (attn_core.varlen): packed sequences, their LSE, and the backward from merged
statistics, against float64 dense references on fresh random inputs.

The bucketed path runs here on the CPU; the flash path (CUDA fp16/bf16) has the same checks at the
end, skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from attn_core import merge_partials, reference, varlen
from attn_core.packing import document_positions
from attn_core.testing import assert_close_to_reference
from attn_core.varlen_impls import bucketed

# queries and keys of each sequence: empty sequences, no keys, no queries, one row, odd lengths
LENS_Q = [3, 0, 5, 1, 9, 4, 0, 17, 2]
LENS_K = [2, 4, 5, 0, 7, 4, 0, 33, 2]
LENS_SAME = [3, 0, 5, 1, 9, 4, 0, 17, 2, 40]


def _cu(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out.to(device)


def _inputs(lens_q, lens_k, H, Hkv, D, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (q, k, v, dout)]


def _reference(q, k, v, dout, cu_q, cu_k, *, is_causal, mask, dtype=torch.float64):
    """(out, lse (H, Tq), dq, dk, dv) of dense attention with a same-sequence mask, in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    seq_q, pos_q = document_positions(cu_q.cpu(), q.shape[0])
    seq_k, pos_k = document_positions(cu_k.cpu(), k.shape[0])
    allowed = seq_q[:, None] == seq_k[None, :]
    if is_causal:
        allowed &= pos_k[None, :] <= pos_q[:, None]
    pad = None if mask is None else mask[None].cpu()
    out, lse = reference.dense_attention(
        *(t[None].cpu() for t in leaves), attn_mask=allowed, key_padding_mask=pad, dtype=dtype
    )
    grads = torch.autograd.grad(out, leaves, dout[None].cpu().to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out[0].detach(), lse[0].detach(), *(g.detach() for g in grads)


def _ours(q, k, v, dout, cu_q, cu_k, *, is_causal, mask):
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    kw = dict(is_causal=is_causal, key_padding_mask=mask)
    out, lse = varlen.varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    grads = varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, **kw)
    return out, lse, *grads


def _check(got, want, base=None):
    names = ("out", "lse", "dq", "dk", "dv")
    for i, name in enumerate(names):
        assert_close_to_reference(name, got[i], want[i], None if base is None else base[i])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)])
def test_bucketed_matches_float64_reference(causal, padding, heads):
    H, Hkv = heads
    lens_q, lens_k = (LENS_SAME, LENS_SAME) if causal else (LENS_Q, LENS_K)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v, dout = _inputs(lens_q, lens_k, H, Hkv, 8, seed=H + 10 * Hkv + causal)
    mask = None
    if padding:
        mask = torch.rand(k.shape[0], generator=torch.Generator().manual_seed(2)) < 0.3
        mask[cu_k[2] : cu_k[3]] = True  # a sequence whose keys are all padding: its rows see nothing
    got = _ours(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=mask)
    assert varlen.explain_varlen(q, k, v, cu_q, cu_k, 40, 40).backend == "bucketed"
    want = _reference(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=mask)
    _check(got, want)
    empty_rows = torch.isneginf(want[1])
    assert torch.equal(torch.isneginf(got[1]), empty_rows)
    assert bool(empty_rows.any()) == (padding or not causal)  # keyless or fully padded sequences
    assert torch.equal(got[0][empty_rows.any(0)], torch.zeros_like(got[0][empty_rows.any(0)]))


def test_bucketed_math_batches_match_float64_reference(monkeypatch):
    """The batches the fused kernels do not take (CUDA fp32, other devices) run the math block path."""
    monkeypatch.setattr(bucketed, "_fused", lambda q: False)
    for causal, (lens_q, lens_k) in ((False, (LENS_Q, LENS_K)), (True, (LENS_SAME, LENS_SAME))):
        cu_q, cu_k = _cu(lens_q), _cu(lens_k)
        q, k, v, dout = _inputs(lens_q, lens_k, 4, 2, 8, seed=5 + causal)
        mask = torch.rand(k.shape[0], generator=torch.Generator().manual_seed(6)) < 0.3
        got = _ours(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=mask)
        _check(got, _reference(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bucketed_low_precision_within_twice_plain_pytorch(dtype):
    cu = _cu(LENS_SAME)
    q, k, v, dout = (t.to(dtype) for t in _inputs(LENS_SAME, LENS_SAME, 4, 2, 16, seed=3))
    got = _ours(q, k, v, dout, cu, cu, is_causal=True, mask=None)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    want = _reference(q, k, v, dout, cu, cu, is_causal=True, mask=None)
    base = _reference(q, k, v, dout, cu, cu, is_causal=True, mask=None, dtype=dtype)
    _check(got, want, base)


def test_backward_from_merged_statistics_is_exact():
    """Keys of every sequence split over two calls, merged by LSE: the two backwards, each given the
    merged out and lse, sum to the gradient of attention over all keys."""
    lens = [5, 0, 12, 1, 30]
    first = [n // 2 for n in lens]
    cu = _cu(lens)
    q, k, v, dout = _inputs(lens, lens, 4, 2, 8, seed=7)
    # key rows of each call: the first half of each sequence's keys, then the rest
    starts = cu[:-1].tolist()
    rows_a = torch.cat([torch.arange(s, s + f) for s, f in zip(starts, first)])
    rows_b = torch.cat([torch.arange(s + f, s + n) for s, f, n in zip(starts, first, lens)])
    calls = [(rows_a, _cu(first)), (rows_b, _cu([n - f for n, f in zip(lens, first)]))]
    outs, lses = [], []
    for rows, cu_k in calls:
        o, l_ = varlen.varlen_forward(q, k[rows], v[rows], cu, cu_k, 30, 15)
        outs.append(o[None])
        lses.append(l_[None])
    out, lse = merge_partials(outs, lses)
    out, lse = out[0].to(q.dtype), lse[0]
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for rows, cu_k in calls:
        dq_c, dk_c, dv_c = varlen.varlen_backward(dout, q, k[rows], v[rows], out, lse, cu, cu_k, 30, 15)
        dq += dq_c
        dk[rows] += dk_c
        dv[rows] += dv_c
    want = _reference(q, k, v, dout, cu, cu, is_causal=False, mask=None)
    _check((out, lse, dq, dk, dv), want)


def test_bucket_batches_respect_the_logits_budget(monkeypatch):
    cu = _cu(LENS_SAME)
    q, k, v, dout = _inputs(LENS_SAME, LENS_SAME, 2, 1, 8, seed=9)
    whole = _ours(q, k, v, dout, cu, cu, is_causal=True, mask=None)
    monkeypatch.setattr(bucketed, "LOGITS_BUDGET", 1)  # one sequence per batch
    batches = bucketed._plan(bucketed.host_offsets(cu), bucketed.host_offsets(cu), 2, torch.device("cpu"), 1)
    assert len(batches) == sum(n > 0 for n in LENS_SAME)
    assert all(b.q_index.shape[1] & (b.q_index.shape[1] - 1) == 0 for b in batches)  # powers of two
    split = _ours(q, k, v, dout, cu, cu, is_causal=True, mask=None)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_explain_names_the_choice_and_the_reasons():
    cu = _cu([4, 4])
    q = torch.randn(8, 2, 8)
    choice = varlen.explain_varlen(q, q, q, cu, cu, 4, 4)
    assert choice.backend == "bucketed"
    assert "CUDA" in " ".join(choice.rejected["flash"])


def _bad_call(change):
    cu = _cu([3, 5])
    args = dict(q=torch.randn(8, 2, 4), k=torch.randn(8, 1, 4), v=torch.randn(8, 1, 4), cu_q=cu, cu_k=cu, mq=5, mk=5)
    kw = {name: change[name] for name in ("is_causal", "key_padding_mask") if name in change}
    args.update({name: value for name, value in change.items() if name not in kw})
    return varlen.varlen_forward(
        args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["mq"], args["mk"], **kw
    )


BAD = {
    "q_2d": (dict(q=torch.randn(8, 4)), ValueError, r"q must have 3 dims"),
    "heads": (
        dict(q=torch.randn(8, 3, 4), k=torch.randn(8, 2, 4), v=torch.randn(8, 2, 4)),
        ValueError,
        r"H=3 must be a positive multiple of kv heads Hkv=2",
    ),
    "int64_offsets": (dict(cu_q=torch.tensor([0, 3, 8])), ValueError, r"cu_seqlens_q must be int32"),
    "offset_count": (dict(cu_k=_cu([8])), ValueError, r"same number of sequences, got 2 and 1"),
    "wrong_end": (dict(cu_q=_cu([3, 4])), ValueError, r"packed length 8.*\[-1\] = 7"),
    "decreasing": (dict(cu_k=torch.tensor([0, 9, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    "max_too_small": (dict(mq=4), ValueError, r"max_seqlen 4 is below the longest sequence of cu_seqlens_q \(5\)"),
    "causal_unequal": (dict(cu_k=_cu([5, 3]), is_causal=True), ValueError, "equal query and key lengths"),
    "negative_max": (dict(mk=-1), ValueError, "non-negative"),
    "mask_shape": (dict(key_padding_mask=torch.zeros(1, 8, dtype=torch.bool)), ValueError, r"\(total_k,\) = \(8,\)"),
    "mask_dtype": (dict(key_padding_mask=torch.zeros(8)), TypeError, "torch.bool"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_naming_the_value(case):
    change, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        _bad_call(change)


def test_backward_checks_out_and_lse():
    cu = _cu([3, 5])
    q, k = torch.randn(8, 2, 4), torch.randn(8, 1, 4)
    out, lse = varlen.varlen_forward(q, k, k, cu, cu, 5, 5)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 8\)"):
        varlen.varlen_backward(out, q, k, k, out, lse.t(), cu, cu, 5, 5)
    with pytest.raises(TypeError, match="q's dtype"):
        varlen.varlen_backward(out.double(), q, k, k, out, lse, cu, cu, 5, 5)


# --- the flash path (needs a CUDA GPU) ---------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_matches_float64_reference_within_twice_plain_pytorch(causal, dtype):
    lens_q = [300, 0, 129, 1, 500, 64, 77]
    lens_k = lens_q if causal else [200, 0, 300, 33, 500, 64, 1]
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")
    q, k, v, dout = (t.to(dtype) for t in _inputs(lens_q, lens_k, 8, 2, 64, seed=11, device="cuda"))
    assert varlen.explain_varlen(q, k, v, cu_q, cu_k, 500, 500).backend == "flash"
    got = _ours(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=None)
    want = _reference(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=None)
    base = _reference(q, k, v, dout, cu_q, cu_k, is_causal=causal, mask=None, dtype=dtype)
    _check(got, want, base)


@needs_cuda
@pytest.mark.gpu
def test_flash_backward_from_merged_statistics_and_split_launches(monkeypatch):
    from attn_core.varlen_impls import flash

    monkeypatch.setattr(flash, "MAX_SEQS_PER_CALL", 2)  # several launches, cut at sequence boundaries
    lens = [130, 70, 256, 90, 300]
    first = [n // 2 for n in lens]
    cu = _cu(lens, "cuda")
    q, k, v, dout = (t.to(torch.bfloat16) for t in _inputs(lens, lens, 4, 4, 64, seed=13, device="cuda"))
    starts = cu[:-1].tolist()
    rows_a = torch.cat([torch.arange(s, s + f) for s, f in zip(starts, first)]).cuda()
    rows_b = torch.cat([torch.arange(s + f, s + n) for s, f, n in zip(starts, first, lens)]).cuda()
    calls = [(rows_a, _cu(first, "cuda")), (rows_b, _cu([n - f for n, f in zip(lens, first)], "cuda"))]
    outs, lses = [], []
    for rows, cu_k in calls:
        assert varlen.explain_varlen(q, k[rows], v[rows], cu, cu_k, 300, 150).backend == "flash"
        o, l_ = varlen.varlen_forward(q, k[rows], v[rows], cu, cu_k, 300, 150)
        outs.append(o[None])
        lses.append(l_[None])
    out, lse = merge_partials(outs, lses)
    out, lse = out[0].to(q.dtype), lse[0]
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for rows, cu_k in calls:
        dq_c, dk_c, dv_c = varlen.varlen_backward(dout, q, k[rows], v[rows], out, lse, cu, cu_k, 300, 150)
        dq += dq_c
        dk[rows] += dk_c.float()
        dv[rows] += dv_c.float()
    want = _reference(q, k, v, dout, cu, cu, is_causal=False, mask=None)
    base = _reference(q, k, v, dout, cu, cu, is_causal=False, mask=None, dtype=torch.bfloat16)
    _check((out, lse, dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)), want, base)
