"""The "sdpa" dilated-attention backend and attn_core.sdpa_ops, against the float64 references.

CPU: every path that runs on CPU (the CPU flash kernel on strided views, the in-place merge, the
exact backward through the merge), the view/stride logic, call planning (chunking, GQA head sets,
batch folding), the block impl registration. CUDA tests (marked gpu) check bf16/fp16 on the GPU
against the 2x rule.
"""

from __future__ import annotations

import threading

import pytest
import torch

from attn_core import blocks, reference, sdpa_ops, views
from attn_core.api import dilated_attention, explain
from attn_core.config import DilatedConfig
from attn_core.testing import assert_close_to_reference

CUDA = torch.cuda.is_available()


def _inputs(B, N, H, Hkv, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _check(q, k, v, seg, rates, *, causal=False, mask=None, mode="all", baseline=True):
    """Outputs and q/k/v grads of backend "sdpa" vs the float64 reference (2x rule vs plain PyTorch in q's dtype)."""
    out = dilated_attention(
        q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode, backend="sdpa"
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go.to(out.dtype).to(out.device))

    def ref(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask
        o, _ = reference.dilated_attention(
            *leaves, seg, rates, is_causal=causal, key_padding_mask=m, head_mode=mode, dtype=dtype
        )
        gs = torch.autograd.grad(o, leaves, go.to(o.device, dtype))
        return o, gs

    r_out, r_grads = ref(torch.float64)
    use_base = baseline and q.dtype != torch.float64
    b_out, b_grads = ref(q.dtype) if use_base else (None, (None, None, None))
    assert_close_to_reference("out", out, r_out, b_out)
    for name, a, r, b in zip(("dq", "dk", "dv"), grads, r_grads, b_grads):
        assert_close_to_reference(name, a, r, b)
    return out, grads


CONFIGS = [
    # (B, N, H, Hkv, D, segments, rates)
    (2, 64, 4, 4, 16, [16, 32], [1, 2]),
    (1, 50, 6, 3, 8, [8, 16], [1, 4]),  # odd N (short last segments), GQA 2:1, uneven head groups
    (2, 37, 8, 2, 8, [4, 12, 24], [1, 2, 4]),  # N not a multiple of any w, GQA 4:1
    (1, 45, 5, 5, 8, [6, 9], [2, 3]),  # H not a multiple of the rates / group count
    (2, 40, 6, 2, 8, [8, 24], [2, 6]),  # GQA where q heads of one offset map to kv heads irregularly
]


@pytest.mark.parametrize("mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(mode, causal, cfg, dtype):
    B, N, H, Hkv, D, seg, rates = cfg
    q, k, v = _inputs(B, N, H, Hkv, D, dtype)
    _check(q, k, v, seg, rates, causal=causal, mode=mode)


@pytest.mark.parametrize("mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_and_empty_rows(mode, causal):
    B, N, H, Hkv, D = 3, 41, 4, 2, 8
    q, k, v = _inputs(B, N, H, Hkv, D, torch.float32, seed=3)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[1] = True  # a fully padded batch row: every output 0, every gradient 0, no NaN
    mask[2, :10] = True  # causal: the first rows of batch 2 see only padding
    out, grads = _check(q, k, v, [8, 16], [1, 2], causal=causal, mask=mask, mode=mode)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu(dtype):
    q, k, v = _inputs(1, 48, 4, 2, 16, dtype, seed=5)
    _check(q, k, v, [16, 48], [1, 4], causal=True)


def test_single_token_and_tiny():
    q, k, v = _inputs(2, 1, 2, 1, 8, torch.float64)
    out, _ = _check(q, k, v, [4, 8], [1, 2])
    # N=1: the one position is selected by offset 0 only; head 1 (offset 1 in group r=2) still has group r=1
    assert torch.isfinite(out).all()
    q, k, v = _inputs(1, 3, 4, 4, 8, torch.float64)
    _check(q, k, v, [4], [2], causal=True, mode="split")


def test_gradcheck_float64():
    q, k, v = _inputs(1, 10, 4, 2, 3, torch.float64, seed=11)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 3] = True

    def f(q, k, v):
        return dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True, key_padding_mask=mask, backend="sdpa")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_non_contiguous_inputs_and_grad_output():
    # q, k, v as transposes of (B, H, N, D) tensors: batch cannot fold into segments -> per-batch calls
    B, N, H, D = 2, 32, 4, 8
    base = [torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)
    assert not views.batch_mergeable(q)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], backend="sdpa")
    r, _ = reference.dilated_attention(q, k, v, [8, 16], [1, 2])
    assert_close_to_reference("out", out, r)
    # an expanded (stride-0) grad_output, as from out.sum()
    (gq,) = torch.autograd.grad(out.sum(), (q,))
    (rq,) = torch.autograd.grad(r.sum(), (q,))
    assert_close_to_reference("dq", gq, rq)


def test_chunked_calls_match(monkeypatch):
    # force many small calls (segment chunks, per-batch pieces): same result as one call per group
    q, k, v = _inputs(2, 96, 4, 2, 8, torch.float64, seed=2)
    big = dilated_attention(q, k, v, [8, 32], [1, 4], is_causal=True, backend="sdpa")
    monkeypatch.setattr(views, "MIN_CALL_ELEMS", 1)
    monkeypatch.setattr(views, "CALL_FRACTION", 64)
    pieces = views.plan_pieces((2, 96, 4, 2, 8), DilatedConfig([8, 32], [1, 4]), True)
    assert any(p.batch is not None and p.nseg < 96 // p.seg_stride for p in pieces)
    _check(q, k, v, [8, 32], [1, 4], causal=True)
    small = dilated_attention(q, k, v, [8, 32], [1, 4], is_causal=True, backend="sdpa")
    assert torch.allclose(big, small, atol=1e-12)


def test_plans_are_cached_per_shape_config_and_budget(monkeypatch):
    cfg = DilatedConfig([8, 32], [1, 4])
    first = views.plan_pieces((2, 96, 4, 2, 8), cfg, True)
    assert views.plan_pieces((2, 96, 4, 2, 8), DilatedConfig([8, 32], [1, 4]), True) is first  # equal config: a hit
    assert views.plan_pieces((2, 97, 4, 2, 8), cfg, True) != first
    monkeypatch.setattr(views, "MIN_CALL_ELEMS", 1)  # another call budget: planned again, not the cached plan
    monkeypatch.setattr(views, "CALL_FRACTION", 64)
    assert len(views.plan_pieces((2, 96, 4, 2, 8), cfg, True)) > len(first)


def _gather(x, p, h0, hs, hn):
    """Reference for piece_view by explicit indexing (a copy)."""
    B = x.shape[0]
    batches = range(B) if p.batch is None else [p.batch]
    rows = []
    for b in batches:
        for m in range(p.nseg):
            pos = [p.start + m * p.seg_stride + t * p.row_stride for t in range(p.rows)]
            heads = [h0 + i * hs for i in range(hn)]
            rows.append(x[b][pos][:, heads].transpose(0, 1))
    return torch.stack(rows)


@pytest.mark.parametrize("shape", [(2, 64, 6, 3, 4), (1, 53, 4, 1, 4), (3, 40, 8, 4, 2)])
@pytest.mark.parametrize("mode", ["all", "split"])
def test_piece_views_are_views_and_cover_the_config(shape, mode):
    B, N, H, Hkv, D = shape
    cfg = DilatedConfig([8, 16, 40], [1, 2, 4], mode)
    q = torch.randn(B, N, H, D)
    k = torch.randn(B, N, Hkv, D)
    weights = torch.zeros(H, N, N)
    for p in views.plan_pieces(shape, cfg, True):
        qv = views.piece_view(q, p, p.q_h0, p.q_hs, p.q_hn)
        kv = views.piece_view(k, p, p.kv_h0, p.kv_hs, p.kv_hn)
        assert qv.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()  # a view, no copy
        assert torch.equal(qv, _gather(q, p, p.q_h0, p.q_hs, p.q_hn))
        assert torch.equal(kv, _gather(k, p, p.kv_h0, p.kv_hs, p.kv_hn))
        assert p.q_hn % p.kv_hn == 0
        for i in range(p.q_hn):  # GQA: query head i of the call reads kv head i // (hn / hk)
            j = p.q_h0 + i * p.q_hs
            assert p.kv_h0 + (i // (p.q_hn // p.kv_hn)) * p.kv_hs == j // (H // Hkv)
            if p.batch not in (None, 0):
                continue  # per-batch pieces repeat the same positions for every batch row
            for m in range(p.nseg):
                pos = torch.tensor([p.start + m * p.seg_stride + t * p.row_stride for t in range(p.rows)])
                assert int(pos.max()) < N
                weights[j][pos[:, None], pos[None, :]] += 1
    # the pieces select exactly the dilated key multiset of the reference (per head, non-causal)
    expected = reference.dilated_weights(N, H, [8, 16, 40], [1, 2, 4], head_mode=mode)
    assert torch.equal(weights.double(), expected)


def test_kv_sets_patterns():
    # 1:1 with stride: H=16, Hkv=8 (2 q per kv), r=4, offset 1 -> q 1,5,9,13 -> kv 0,2,4,6
    assert views.head_calls([1, 5, 9, 13], 2) == [(1, 4, 4, 0, 2, 4)]
    # shared consecutive: H=16, Hkv=2 (8 q per kv), r=2, offset 1 -> q 1,3,..,15 -> kv 0x4, 1x4
    assert views.head_calls(list(range(1, 16, 2)), 8) == [(1, 2, 8, 0, 1, 2)]
    # irregular: q 0,3 (r=3) with 2 q per kv -> kv 0,1 (1:1, stride 1) ; q 0,3,6 -> kv 0,1,3 -> per kv head
    assert views.head_calls([0, 3], 2) == [(0, 3, 2, 0, 1, 2)]
    assert views.head_calls([0, 3, 6], 2) == [(0, 3, 1, 0, 1, 1), (3, 3, 1, 1, 1, 1), (6, 3, 1, 3, 1, 1)]


@pytest.mark.parametrize("causal", [False, True])
def test_ops_on_strided_views_with_bias(causal):
    # sdpa_ops directly: strided q/k/v, GQA, a key bias with fully masked rows, backward with a given lse
    x = torch.randn(3, 40, 6, 8, dtype=torch.float64)
    kvx = torch.randn(3, 40, 3, 8, dtype=torch.float64)
    q = x[:, 1::2, 0::2].transpose(1, 2)  # (3, 3, 20, 8) strided
    k = kvx[:, 1::2].transpose(1, 2)  # (3, 3, 20, 8): 1:1
    v = k.flip(-1).contiguous()
    bias = torch.zeros(3, 20, dtype=torch.float64)
    bias[0] = float("-inf")
    bias[1, :5] = float("-inf")
    out, lse = sdpa_ops.attention_forward(q, k, v, is_causal=causal, scale=0.3, key_bias=bias)
    ro, rl = blocks.block_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, softmax_scale=0.3,
        key_padding_mask=torch.isinf(bias),
    )  # fmt: skip
    assert torch.allclose(out.transpose(1, 2), ro, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    assert torch.allclose(lse[torch.isfinite(lse)], rl[torch.isfinite(rl)], atol=1e-12)
    do = torch.randn_like(out)
    g = sdpa_ops.attention_backward(do, q, k, v, out, lse, is_causal=causal, scale=0.3, key_bias=bias)
    rg = blocks.block_backward(
        do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ro, rl,
        is_causal=causal, softmax_scale=0.3, key_padding_mask=torch.isinf(bias),
    )  # fmt: skip
    for a, r in zip(g, rg):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.transpose(1, 2), r, atol=1e-10)


def test_reasons_and_auto_choice():
    q, k, v = _inputs(1, 16, 2, 2, 8, torch.float32)
    choice = explain(q, k, v, [8], [1])
    assert choice.backend == "sdpa"
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, 8, dropout_p=0.1)
    assert any("dropout" in r for r in reasons)
    with pytest.raises(ValueError, match="dropout"):
        dilated_attention(q, k, v, [8], [1], dropout_p=0.1, backend="sdpa")
    assert explain(q, k, v, [8], [1], dropout_p=0.1).backend == "reference"
    assert sdpa_ops.unsupported_reasons(torch.device("meta"), torch.float16, 64)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sdpa_ops.attention_forward(q.transpose(1, 2), k[:, :, :0].transpose(1, 2), v[:, :, :0].transpose(1, 2),
                                   is_causal=False, scale=1.0)  # fmt: skip


def test_block_impl_choice_is_explained_and_thread_safe():
    q = torch.randn(1, 8, 2, 8)
    choice = blocks.explain_block(q, q, q)
    assert choice.backend == "math"  # CPU inputs keep the math path
    assert any("CUDA" in r for r in choice.rejected["cudnn"])
    padded = blocks.explain_block(q, q, q, key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))
    assert padded.backend == "math" and "math" in str(padded)
    with pytest.raises(ValueError, match="4 dims"):
        blocks.explain_block(q[0], q, q)
    # concurrent first calls load each implementation once and all get the same result
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(target=lambda: results.append(blocks.block_forward(q, q, q, softmax_scale=0.5)[0]))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(torch.equal(r, results[0]) for r in results)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_reference(dtype, mode, causal):
    q, k, v = _inputs(2, 300, 8, 4, 64, dtype, device="cuda", seed=13)
    mask = torch.rand(2, 300, device="cuda") < 0.2
    mask[1, :40] = True
    _check(q, k, v, [64, 128, 256], [1, 2, 4], causal=causal, mask=mask, mode=mode)
    assert explain(q, k, v, [64], [1]).backend == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_block_impl_matches_math():
    q, k, v = (torch.randn(2, 96, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert blocks.explain_block(q, k, v, is_causal=True).backend == "cudnn"
    out, lse = blocks.block_forward(q, k, v, is_causal=True, softmax_scale=0.125)
    r, rl = reference.dense_attention(q, k, v, is_causal=True, softmax_scale=0.125)
    b, _ = reference.dense_attention(q, k, v, is_causal=True, softmax_scale=0.125, dtype=torch.bfloat16)
    assert_close_to_reference("block out", out, r, b)
    assert torch.allclose(lse.double(), rl, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_merge_triton_interpreter(monkeypatch, dtype):
    # the CUDA merge kernel's logic on CPU: same result as attn_core.merge.merge_into_ on strided views
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from attn_core.merge import merge_into_

    g = torch.Generator().manual_seed(4)
    O = torch.randn(2, 10, 6, 24, generator=g).to(dtype)  # (B, N, H, D) accumulator
    L = torch.randn(2, 10, 6, generator=g)
    o_v = O[:, 1::2, 0::2].transpose(1, 2)  # (2, 3, 5, 24) strided
    l_v = L[:, 1::2, 0::2].transpose(1, 2)
    l_v[0, 0, :2] = float("-inf")  # accumulator empty
    c = torch.randn(2, 3, 5, 24, generator=g).to(dtype)
    lc = torch.randn(2, 3, 5, generator=g)
    lc[0, 0, 0] = float("-inf")  # both empty: stays 0 / -inf
    lc[1, 1, :] = float("-inf")  # block empty
    O[0, 1, 0] = 0.0  # the (0, 0, 0) row: empty accumulators hold 0
    o_ref, l_ref = o_v.double().clone(), l_v.double().clone()
    merge_into_(o_ref.transpose(1, 2), l_ref, c.double().transpose(1, 2), lc.double())
    untouched = O.clone()
    sdpa_ops.merge_strided_(o_v, l_v, c, lc)
    assert torch.equal(torch.isneginf(l_v), torch.isneginf(l_ref))
    fin = torch.isfinite(l_ref)
    assert torch.allclose(l_v[fin].double(), l_ref[fin], atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(o_v.double(), o_ref, atol=tol)
    assert torch.equal(o_v[0, 0, 0], torch.zeros_like(o_v[0, 0, 0]))
    # rows outside the view are untouched
    keep = torch.ones(2, 10, 6, dtype=torch.bool)
    keep[:, 1::2, 0::2] = False
    assert torch.equal(O[keep], untouched[keep])


@pytest.mark.parametrize("fused", [True, False])
def test_merge_at_rows(monkeypatch, fused):
    # rows[t]: block row t merges into accumulator row rows[t] in place; other rows untouched. The fused
    # kernel (interpreter) and the fallback (index_select / merge_into_ / index_copy_) agree with the math
    from attn_core.merge import merge_into_

    if fused:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    O = torch.randn(17, 6, 24, generator=g)  # (N, H, D) accumulator storage
    L = torch.randn(17, 6, generator=g)
    L[3, 0] = float("-inf")
    O[3, 0] = 0.0
    rows = torch.tensor([3, 16, 0, 9, 4])
    o_v, l_v = O[:, 1::2], L[:, 1::2]  # (N, 3, D) head-strided views, as packed_views passes them
    c = torch.randn(5, 3, 24, generator=g)
    lc = torch.randn(3, 5, generator=g)
    lc[0, 0] = float("-inf")  # both empty at (row 3, head 1): stays 0 / -inf
    lc[2, 1] = float("-inf")
    o_ref, l_ref = O.double().clone(), L.double().clone()
    acc_o, acc_l = o_ref[rows][:, 1::2], l_ref[rows][:, 1::2]
    merge_into_(acc_o[None], acc_l.t()[None], c.double()[None], lc.double()[None])
    o_ref[rows.unsqueeze(1), torch.arange(1, 6, 2)] = acc_o
    l_ref[rows.unsqueeze(1), torch.arange(1, 6, 2)] = acc_l
    args = (o_v.transpose(0, 1)[None], l_v.t()[None], c.transpose(0, 1)[None], lc[None], rows)
    if fused:
        sdpa_ops.merge_strided_(*args)
    else:
        monkeypatch.setattr(sdpa_ops, "triton_installed", lambda: False)
        sdpa_ops.merge_views_(*args)
    assert torch.equal(torch.isneginf(L), torch.isneginf(l_ref))
    fin = torch.isfinite(l_ref)
    assert torch.allclose(L[fin].double(), l_ref[fin], atol=1e-6)
    assert torch.allclose(O.double(), o_ref, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        sdpa_ops.merge_strided_(*args[:4], rows[:3])


@pytest.mark.parametrize("mode", ["all", "split"])
def test_call_size_budget_bounds_temporaries(monkeypatch, mode):
    # every call reads at most max(q elements / CALL_FRACTION, MIN_CALL_ELEMS) query elements (or one segment):
    # this is what bounds the per-call temporaries (out in forward; dq, dk, dv in backward)
    monkeypatch.setattr(views, "MIN_CALL_ELEMS", 256)
    B, N, H, Hkv, D = 2, 1000, 8, 4, 8
    cfg = DilatedConfig([64, 128, 256], [1, 2, 4], mode)
    budget = max(B * N * H * D // views.CALL_FRACTION, views.MIN_CALL_ELEMS)
    pieces = views.plan_pieces((B, N, H, Hkv, D), cfg, True)
    for p in pieces:
        batch = (B if p.batch is None else 1) * p.nseg
        elems = batch * p.q_hn * p.rows * D
        assert elems <= budget or p.nseg == 1, (p, elems, budget)
    # and together they cover every selected (position, head) exactly once per group
    covered = torch.zeros(len(cfg.segment_lengths), N, H, dtype=torch.int64)
    for p in pieces:
        if p.batch not in (None, 0):
            continue
        for m in range(p.nseg):
            pos = torch.arange(p.rows) * p.row_stride + m * p.seg_stride + p.start
            for i in range(p.q_hn):
                covered[p.group, pos, p.q_h0 + i * p.q_hs] += 1
    for g in range(cfg.num_groups):
        for j in cfg.heads_for_group(g, H):
            sel = (torch.arange(N) % cfg.dilation_rates[g]) == cfg.head_offset(g, j)
            assert torch.equal(covered[g, :, j], sel.long())


@pytest.mark.parametrize("bias", [None, "finite", "masked"])
def test_one_pair_backward_matches_the_kernel_backward(bias):
    """cuDNN refuses one query and one key; the closed form must equal the general backward, with
    a merged lse larger than the pair's own score (the row also saw keys elsewhere), GQA and bias."""
    g = torch.Generator().manual_seed(3)
    B, h, hk, D = 2, 6, 3, 8
    q = torch.randn(B, h, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, hk, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
    key_bias = None
    if bias == "finite":
        key_bias = torch.randn(B, 1, generator=g, dtype=torch.float64)
    elif bias == "masked":
        key_bias = torch.tensor([[0.0], [float("-inf")]], dtype=torch.float64)
    out, lse = sdpa_ops.attention_forward(q, k, v, is_causal=False, scale=0.3, key_bias=key_bias)
    # merge with another block the row saw: the final statistics differ from this call's own
    other_out = torch.randn(B, h, 1, D, generator=g, dtype=torch.float64)
    other_lse = torch.randn(B, h, 1, generator=g, dtype=torch.float64)
    final_lse = torch.logaddexp(lse, other_lse)
    w = torch.exp(lse - final_lse).nan_to_num(0.0).unsqueeze(-1)
    final_out = w * out + (1 - w) * other_out
    dout = torch.randn(B, h, 1, D, generator=g, dtype=torch.float64)
    want = sdpa_ops.attention_backward(
        dout, q, k, v, final_out, final_lse, is_causal=False, scale=0.3, key_bias=key_bias
    )
    got = sdpa_ops.one_pair_backward(dout, q, k, v, final_out, final_lse, scale=0.3, key_bias=key_bias)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if bias == "masked":
        assert not got[2][1].any()  # the masked key of batch 1 gets no gradient


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_one_token_and_one_token_documents(causal):
    """One token, and packed documents of one token (1x1 pieces that cuDNN's backward refuses)."""
    q, k, v = _inputs(1, 1, 8, 4, 64, torch.bfloat16, device="cuda", seed=5)
    _check(q, k, v, [4, 8], [1, 2], causal=causal)
    n = 41
    cu = torch.tensor([0, 1, 2, 19, 20, n], dtype=torch.int32, device="cuda")
    q, k, v = _inputs(1, n, 8, 2, 64, torch.bfloat16, device="cuda", seed=6)
    out = dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=causal, cu_seqlens=cu, backend="sdpa")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, _ = reference.dilated_attention(
        *leaves, [4, 8], [1, 2], is_causal=causal, cu_seqlens=cu, dtype=torch.float64
    )
    r_grads = torch.autograd.grad(r_out, leaves, go.double())
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b_out, _ = reference.dilated_attention(*low, [4, 8], [1, 2], is_causal=causal, cu_seqlens=cu, dtype=torch.bfloat16)
    b_grads = torch.autograd.grad(b_out, low, go)
    assert_close_to_reference("out", out, r_out, b_out)
    for name, a, r, b in zip(("dq", "dk", "dv"), grads, r_grads, b_grads):
        assert_close_to_reference(name, a, r, b)
