"""Packed documents (cu_seqlens) on the sdpa backend: attn_core.packed_views and attn_core.varlen.

Every packed run must equal the float64 reference run on each document alone and concatenated
(outputs and dq/dk/dv), on fresh random inputs: documents of length 1, shorter than the smallest
segment, exactly a segment, longer than the largest, empty; causal or not; GQA; both head modes;
key padding; fp32/fp64 exactly, fp16/bf16 under the 2x rule. Both routes of the planner (strided
pieces for long documents, gathered varlen calls for the rest) are exercised by moving its
thresholds.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from attn_core import (
    DilatedConfig,
    LongNetLM,
    MultiheadDilatedAttention,
    dilated_attention,
    explain,
    last_backend,
    packed_views,
    reference,
)
from attn_core.testing import assert_close_to_reference

# With segments (4, 8): empty (also first and last), 1 token, shorter than the smallest segment,
# exactly a segment, longer than the largest, odd lengths
LENGTHS = [0, 1, 3, 4, 0, 8, 19, 5, 13, 40, 0]
# (segment_lengths, dilation_rates, H, Hkv, D)
CONFIGS = {
    "classic": ([4, 8], [1, 2], 4, 4, 8),
    "three_groups_gqa": ([3, 6, 12], [1, 2, 4], 6, 3, 4),
    "irregular_gqa": ([4, 8], [2, 2], 6, 2, 4),  # offsets' kv heads are no strided run: one call per kv head
    "mqa_unselected_positions": ([4, 8], [2, 4], 5, 1, 4),
}


def _cu(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out


def _inputs(N, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(1, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H)]
    return [t.to(dtype) for t in tensors]


def _run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    if not out.requires_grad:
        return out.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, leaves)]


def _per_document(seg, rates, q, k, v, dout, cu, mask, dtype=torch.float64, **kw):
    """The reference run on each document alone (in ``dtype``), concatenated: out and grads."""

    def packed(a, b, c):
        parts = []
        for s, e in itertools.pairwise(cu.tolist()):
            m = None if mask is None else mask[:, s:e]
            o, _ = reference.dilated_attention(
                a[:, s:e], b[:, s:e], c[:, s:e], seg, rates, key_padding_mask=m, dtype=dtype, **kw
            )
            parts.append(o.to(dtype))
        return torch.cat(parts, dim=1)

    return _run(packed, q, k, v, dout)


def _sdpa(seg, rates, q, k, v, dout, cu, mask, **kw):
    out, grads = _run(
        lambda a, b, c: dilated_attention(
            a, b, c, seg, rates, key_padding_mask=mask, cu_seqlens=cu, backend="sdpa", **kw
        ),
        q,
        k,
        v,
        dout,
    )
    assert last_backend() == "sdpa"
    return out, grads


def _assert_matches(out, grads, ref_out, ref_grads, base_out=None, base_grads=(None, None, None)):
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        assert_close_to_reference(name, got, ref, base)


# (route, causal, padding): strided pieces and gathered calls in float64 (the gathered executor),
# the strided-rows kernels in float32 under the Triton interpreter (slow there: two combinations;
# in "kernel_pieces" the backward runs the documents' full segments as strided pieces beside the
# kernels while the forward runs every segment on the kernels: the passes' plans differ)
ROUTES = [(r, c, p) for r in ("gathered", "strided") for c in (False, True) for p in (False, True)]
ROUTES += [("kernel", False, False), ("kernel_pieces", True, True)]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize(("route", "causal", "padding"), ROUTES)
def test_sdpa_packed_matches_float64_per_document(config, head_mode, causal, padding, route, monkeypatch):
    if route in ("strided", "kernel_pieces"):  # every document with a full segment takes a strided piece
        monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK", 0)  # (on the kernels: in the backward only)
    seg, rates, H, Hkv, D = CONFIGS[config]
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    seed = zlib.crc32(f"{config}-{head_mode}-{causal}-{padding}-{route}".encode())
    on_kernels = route.startswith("kernel")
    dtype = torch.float32 if on_kernels else torch.float64
    q, k, v, dout = _inputs(N, H, Hkv, D, dtype, seed)
    if packed_views.uses_strided_kernel(q) != on_kernels:
        pytest.skip("the kernel route needs triton's CPU interpreter (TRITON_INTERPRET=1)")
    mask = None
    if padding:
        mask = torch.rand(1, N, generator=torch.Generator().manual_seed(seed)) < 0.3
        mask[0, 8:16] = True  # the document of length 8 is fully padded: its rows output 0
    kw = {"is_causal": causal, "head_mode": head_mode}
    out, grads = _sdpa(seg, rates, q, k, v, dout, cu, mask, **kw)
    ref_out, ref_grads = _per_document(seg, rates, q, k, v, dout, cu, mask, **kw)
    base_out, base_grads = None, (None, None, None)
    if dtype != torch.float64:
        base_out, base_grads = _per_document(seg, rates, q, k, v, dout, cu, mask, dtype=dtype, **kw)
    assert out.dtype == dtype and out.shape == (1, N, H, D)
    _assert_matches(out, grads, ref_out, ref_grads, base_out, base_grads)
    if padding:
        assert torch.equal(out[0, 8:16], torch.zeros_like(out[0, 8:16]))
    dilated = DilatedConfig(seg, rates, head_mode)
    for backward in (False, True):
        plan = packed_views.plan_packed(cu, (N, H, Hkv, D), dilated, q.device, kernel=on_kernels, backward=backward)
        assert any(group.pieces for group in plan) == (route == "strided" or (route == "kernel_pieces" and backward))
        assert any(group.sequences for group in plan) == on_kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route", ["gathered", "strided"])
def test_sdpa_packed_low_precision_within_twice_plain_pytorch(dtype, route, monkeypatch):
    if route == "strided":
        monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK", 0)
    seg, rates, H, Hkv, _ = CONFIGS["three_groups_gqa"]
    cu = _cu(LENGTHS)
    q, k, v, dout = _inputs(int(cu[-1]), H, Hkv, 16, dtype, 17)
    out, grads = _sdpa(seg, rates, q, k, v, dout, cu, None, is_causal=True)
    ref_out, ref_grads = _per_document(seg, rates, q, k, v, dout, cu, None, is_causal=True)
    base_out, base_grads = _per_document(seg, rates, q, k, v, dout, cu, None, dtype=dtype, is_causal=True)
    assert out.dtype == dtype
    _assert_matches(out, grads, ref_out, ref_grads, base_out, base_grads)


def test_strided_pieces_are_capped_largest_documents_first(monkeypatch):
    monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK", 0)
    monkeypatch.setattr(packed_views, "STRIDED_MAX_PIECES", 2)
    seg, rates, H, Hkv, D = CONFIGS["classic"]
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    plan = packed_views.plan_packed(
        cu, (N, H, Hkv, D), DilatedConfig(seg, rates), torch.device("cpu"), kernel=False, backward=False
    )
    # group (4, 1): one head run, so the two documents with the most full segments (40 and 19 tokens)
    starts = sorted(p.start for p in plan[0].pieces)
    assert starts == [int(cu[6]), int(cu[9])]
    assert [p.nseg for p in sorted(plan[0].pieces, key=lambda p: p.start)] == [4, 10]
    q, k, v, dout = _inputs(N, H, Hkv, D, torch.float64, 5)
    out, grads = _sdpa(seg, rates, q, k, v, dout, cu, None, is_causal=True)
    _assert_matches(out, grads, *_per_document(seg, rates, q, k, v, dout, cu, None, is_causal=True))


def test_thousands_of_documents_plan_a_bounded_number_of_calls():
    g = torch.Generator().manual_seed(31)
    lengths = [*torch.randint(0, 9, (2000,), generator=g).tolist(), 70, 300]
    cu = _cu(lengths)
    N = int(cu[-1])
    seg, rates, H, Hkv, D = [4, 8, 16], [1, 2, 4], 4, 2, 8
    plan = packed_views.plan_packed(
        cu, (N, H, Hkv, D), DilatedConfig(seg, rates), torch.device("cpu"), kernel=False, backward=False
    )
    # per group: <= 2 calls (long / short sequences) per (offset, head run), however many documents
    assert sum(len(group.calls) for group in plan) <= 2 * (1 + 2 + 4)
    q, k, v, dout = _inputs(N, H, Hkv, D, torch.float64, 37)
    out, grads = _sdpa(seg, rates, q, k, v, dout, cu, None, is_causal=True)
    # the reference backend (vectorised over documents; checked against the float64 reference in
    # test_packed.py): the dense reference would hold (H, N, N) weights
    ref_out, ref_grads = _run(
        lambda a, b, c: dilated_attention(a, b, c, seg, rates, cu_seqlens=cu, is_causal=True, backend="reference"),
        q,
        k,
        v,
        dout,
    )
    _assert_matches(out, grads, ref_out, ref_grads)


def test_rate_one_group_reads_the_packed_tensors_without_a_gather():
    cu = _cu([70, 0, 130, 66])  # every segment at least 64 rows: one call over every position
    N = int(cu[-1])
    plan = packed_views.plan_packed(
        cu, (N, 2, 1, 8), DilatedConfig([128], [1]), torch.device("cpu"), kernel=False, backward=False
    )
    (group,) = plan
    assert [c.rows for c in group.calls] == [None]
    assert group.calls[0].cu_seqlens.tolist() == [0, 70, 198, 200, 266]
    q, k, v, dout = _inputs(N, 2, 1, 8, torch.float64, 41)
    out, grads = _sdpa([128], [1], q, k, v, dout, cu, None)
    _assert_matches(out, grads, *_per_document([128], [1], q, k, v, dout, cu, None))


def test_short_and_long_segments_run_as_separate_calls():
    cu = _cu([3, 100, 2, 1, 5, 2, 4, 1, 1, 3])  # mean rows < 64: the 100-row segment gets its own call
    N = int(cu[-1])
    plan = packed_views.plan_packed(
        cu, (N, 2, 2, 8), DilatedConfig([128], [1]), torch.device("cpu"), kernel=False, backward=False
    )
    lengths = sorted(int(c.cu_seqlens.numel()) - 1 for c in plan[0].calls)
    assert lengths == [1, 9]
    q, k, v, dout = _inputs(N, 2, 2, 8, torch.float64, 43)
    out, grads = _sdpa([128], [1], q, k, v, dout, cu, None, is_causal=True)
    _assert_matches(out, grads, *_per_document([128], [1], q, k, v, dout, cu, None, is_causal=True))


def test_auto_picks_sdpa_for_packed_calls():
    q = torch.randn(1, 16, 2, 8)
    cu = _cu([7, 9])
    choice = explain(q, q, q, [4, 8], [1, 2], cu_seqlens=cu)
    assert choice.backend == "sdpa" and choice.rejected["reference"] == ()
    dilated_attention(q, q, q, [4, 8], [1, 2], cu_seqlens=cu)
    assert last_backend() == "sdpa"
    # dropout still goes to the reference backend, and says why
    dropped = explain(q, q, q, [4, 8], [1, 2], cu_seqlens=cu, dropout_p=0.1)
    assert dropped.backend == "reference" and any("dropout" in r for r in dropped.rejected["sdpa"])


def test_modules_and_lm_run_packed_calls_on_sdpa():
    torch.manual_seed(0)
    cu = _cu([5, 0, 11, 1])
    N = int(cu[-1])
    mha = MultiheadDilatedAttention(16, 4, [4, 8], [1, 2], num_kv_heads=2, dtype=torch.float64)
    x = torch.randn(1, N, 16, dtype=torch.float64, requires_grad=True)
    out, _ = mha(x, x, x, is_causal=True, cu_seqlens=cu)
    assert last_backend() == "sdpa"
    ref = torch.cat(
        [mha(x[:, s:e], x[:, s:e], x[:, s:e], is_causal=True)[0] for s, e in itertools.pairwise(cu.tolist())], 1
    )
    assert_close_to_reference("out", out, ref)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert_close_to_reference("dx", gx, gx_ref)

    lm = LongNetLM(30, 16, 4, 2, [4, 8], [1, 2], num_kv_heads=2, dropout=0.0, dtype=torch.float64)
    ids = torch.randint(0, 30, (1, N), generator=torch.Generator().manual_seed(1))
    logits = lm(ids, cu_seqlens=cu)
    assert last_backend() == "sdpa"
    per_doc = torch.cat([lm(ids[:, s:e]) for s, e in itertools.pairwise(cu.tolist()) if e > s], 1)
    assert_close_to_reference("logits", logits, per_doc)


def test_piece_lanes_keep_shared_rows_together_and_balance_work():
    from attn_core.views import Piece

    def piece(start, nseg, q_h0):
        return Piece(0, start, nseg, 8, 4, 2, 0, q_h0, 1, 1, q_h0, 1, 1, True)

    # starts 0 and 50 each carry two head runs (the same rows): they must share a lane
    pieces = [piece(0, 9, 0), piece(0, 9, 1), piece(50, 1, 0), piece(50, 1, 1), piece(90, 4, 0), piece(130, 3, 0)]
    for lanes in (0, 1, 2, 3, 8):
        got = packed_views.piece_lanes(pieces, lanes)
        assert 1 <= len(got) <= max(lanes, 1) and all(got)
        assert sorted(itertools.chain.from_iterable(got), key=pieces.index) == pieces  # each piece once
        for lane in got:
            assert list(lane) == sorted(lane, key=pieces.index)  # the pieces' order within a lane
        lane_of = {id(p): i for i, lane in enumerate(got) for p in lane}
        assert lane_of[id(pieces[0])] == lane_of[id(pieces[1])] and lane_of[id(pieces[2])] == lane_of[id(pieces[3])]
    # two lanes: the 18-segment start alone, the other 10 segments' worth beside it
    assert [sorted({p.start for p in lane}) for lane in packed_views.piece_lanes(pieces, 2)] == [[0], [50, 90, 130]]
    assert packed_views.piece_lanes([], 4) == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("forward_pieces", [True, False])
def test_cuda_pieces_beside_kernel_tables_match_float64(head_mode, causal, streams, forward_pieces, monkeypatch):
    """bf16 on CUDA: strided pieces on side streams (PACKED_STREAMS) beside the strided-rows
    kernels' tables, every document with a full segment on a piece in the backward (and in the
    forward, or there every segment on the kernels), against float64 per document."""
    monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK", 0)
    monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK_KERNEL_FORWARD", 0 if forward_pieces else 1 << 62)
    monkeypatch.setattr(packed_views, "STRIDED_MAX_PIECES", 64)
    monkeypatch.setattr(packed_views, "PACKED_STREAMS", streams)
    seg, rates, H, Hkv, D = [64, 128, 256], [1, 2, 4], 8, 2, 64
    cu = _cu([300, 1, 700, 64, 517, 129, 900, 3, 260])
    N = int(cu[-1])
    seed = zlib.crc32(f"streams-{head_mode}-{causal}-{streams}-{forward_pieces}".encode())
    q, k, v, dout = (t.cuda() for t in _inputs(N, H, Hkv, D, torch.bfloat16, seed))
    cu = cu.cuda()
    kw = {"is_causal": causal, "head_mode": head_mode}
    config = DilatedConfig(seg, rates, head_mode)
    if not packed_views.uses_strided_kernel(q):
        pytest.skip("the strided-rows kernels need Triton on this GPU")
    for backward in (False, True):
        plan = packed_views.plan_packed(cu, (N, H, Hkv, D), config, q.device, kernel=True, backward=backward)
        if backward or forward_pieces:  # streams 4: the tables on one stream, the pieces of 7 documents over three
            assert any(group.sequences and len(group.lanes) == (1 if streams == 1 else 3) for group in plan)
        else:
            assert all(not group.pieces for group in plan)
    ref_out, ref_grads = _per_document(seg, rates, q, k, v, dout, cu, None, **kw)
    base_out, base_grads = _per_document(seg, rates, q, k, v, dout, cu, None, dtype=torch.bfloat16, **kw)
    for _ in range(3):  # a race shows as a wrong element in some run
        out, grads = _sdpa(seg, rates, q, k, v, dout, cu, None, **kw)
        _assert_matches(out, grads, ref_out, ref_grads, base_out, base_grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_packed_step_reads_the_offsets_once():
    """The layers and the backward of a step pass the same cu_seqlens: after the first call reads
    it, a packed forward and backward wait for the GPU nowhere (no host synchronisation)."""
    seg, rates, H, Hkv, D = [64, 128], [1, 2], 4, 2, 64
    cu = _cu([300, 1, 129, 700]).cuda()
    N = int(cu[-1])
    q, k, v, dout = (t.cuda().requires_grad_(i < 3) for i, t in enumerate(_inputs(N, H, Hkv, D, torch.bfloat16, 3)))

    def step():
        out = dilated_attention(q, k, v, seg, rates, is_causal=True, cu_seqlens=cu, backend="sdpa")
        return torch.autograd.grad(out, (q, k, v), dout)

    want = step()  # reads cu once, builds and caches the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
