"""The sdpa backend's two executors (gathered: one call per dilated group; strided: one call per
group and offset), each forced through GATHER_MAX_ELEMS, against the float64 reference and each
other: outputs and dq, dk, dv, both head modes, causal, GQA, key padding, short last segments,
segments longer than N. Plus the executor rule, the plan's slots and layers, the cache and the
capture fallback. CPU only (the attention calls are the CPU flash op).
"""

from __future__ import annotations

import pytest
import torch

from attn_core import gathered_groups, reference, sdpa_ops, views
from attn_core.api import dilated_attention
from attn_core.backends import sdpa as sdpa_backend
from attn_core.config import DilatedCall, DilatedConfig
from attn_core.testing import assert_close_to_reference

CPU = torch.device("cpu")


def _inputs(B, N, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for h in (H, Hkv, Hkv)]


@pytest.fixture(params=["gathered", "strided"])
def executor(request, monkeypatch):
    """Force one executor: GATHER_MAX_ELEMS 0 sends every call to the strided one."""
    if request.param == "strided":
        monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", 0)
    else:
        monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", 1 << 40)
    return request.param


def _run(q, k, v, seg, rates, *, causal, mode, mask=None, go=None):
    out = dilated_attention(
        q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode, backend="sdpa"
    )
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if go is None else go
    return out, torch.autograd.grad(out, (q, k, v), go.to(out.dtype))


def _check(q, k, v, seg, rates, *, causal=False, mode="all", mask=None):
    """Outputs and grads vs the float64 reference (2x rule against plain PyTorch in q's dtype)."""
    out, grads = _run(q, k, v, seg, rates, causal=causal, mode=mode, mask=mask)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def ref(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, _ = reference.dilated_attention(
            *leaves, seg, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode, dtype=dtype
        )
        return o, torch.autograd.grad(o, leaves, go.to(dtype))

    r_out, r_grads = ref(torch.float64)
    b_out, b_grads = ref(q.dtype) if q.dtype != torch.float64 else (None, (None,) * 3)
    assert_close_to_reference("out", out, r_out, b_out)
    for name, a, r, b in zip(("dq", "dk", "dv"), grads, r_grads, b_grads):
        assert_close_to_reference(name, a, r, b)
    return out, grads


CONFIGS = [
    # (B, N, H, Hkv, D, segments, rates)
    (2, 64, 8, 2, 8, [8, 16, 32, 64], [1, 2, 4, 8]),  # LongNet's rates, N a multiple of every w, GQA 4:1
    (1, 64, 8, 1, 8, [8, 16, 32, 64], [1, 2, 4, 8]),  # MQA
    (2, 37, 8, 2, 8, [4, 12, 24], [1, 2, 4]),  # N a multiple of no w: short last segments
    (1, 45, 5, 5, 8, [6, 9, 90], [2, 3, 5]),  # odd heads per group (split 2/2/1), w > N, H not a multiple of r
    (2, 40, 6, 2, 8, [8, 24], [2, 6]),  # (offset, kv head) pairs shared by 2 or 1 query heads: layered slots
]


@pytest.mark.parametrize("mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_matches_reference_float64(executor, mode, causal, cfg):
    B, N, H, Hkv, D, seg, rates = cfg
    q, k, v = _inputs(B, N, H, Hkv, D, torch.float64, seed=N)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[0, :5] = True  # causal: the first rows of batch 0 see only padding (out 0, no NaN)
    _check(q, k, v, seg, rates, causal=causal, mode=mode)
    _check(q, k, v, seg, rates, causal=causal, mode=mode, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["all", "split"])
def test_low_precision_two_x_rule(executor, dtype, mode):
    q, k, v = _inputs(2, 48, 8, 2, 16, dtype, seed=3)
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[1, 30:] = True
    _check(q, k, v, [8, 16, 48], [1, 2, 4], causal=True, mode=mode, mask=mask)


def test_one_token_and_tiny(executor):
    q, k, v = _inputs(2, 1, 4, 2, 8, torch.float64)
    out, _ = _check(q, k, v, [4, 8], [1, 2])
    assert torch.isfinite(out).all()
    q, k, v = _inputs(1, 3, 4, 4, 8, torch.float64)
    _check(q, k, v, [4], [2], causal=True, mode="split")


def test_fully_padded_row_gives_zero(executor):
    q, k, v = _inputs(3, 32, 4, 2, 8, torch.float32, seed=5)
    mask = torch.zeros(3, 32, dtype=torch.bool)
    mask[1] = True
    out, grads = _check(q, k, v, [8, 16], [1, 2], causal=True, mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all()


def test_executors_agree_and_the_threshold_picks(monkeypatch):
    B, N, H, Hkv, D = 2, 48, 8, 2, 8
    seg, rates = [8, 16, 32], [1, 2, 4]
    q, k, v = _inputs(B, N, H, Hkv, D, torch.float64, seed=9)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) < 0.2
    ran: list[str] = []
    for name in ("forward_gathered", "backward_gathered"):
        real = getattr(gathered_groups, name)
        monkeypatch.setattr(
            gathered_groups, name, lambda *a, _real=real, _name=name, **kw: (ran.append(_name), _real(*a, **kw))[1]
        )
    elems = B * N * H * D
    results = {}
    for limit, want in ((elems, "gathered"), (elems - 1, "strided")):  # at the threshold: gathered; above: strided
        monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", limit)
        call = DilatedCall(q, k, v, DilatedConfig(seg, rates), True, mask, D**-0.5, 0.0)
        assert sdpa_backend.executor(call)[0] == want
        assert ("GATHER_MAX_ELEMS" in sdpa_backend.executor(call)[1]) and (str(limit) in sdpa_backend.executor(call)[1])
        ran.clear()
        results[want] = _run(q, k, v, seg, rates, causal=True, mode="all", mask=mask)
        assert ran == (["forward_gathered", "backward_gathered"] if want == "gathered" else [])
    for a, b in zip((results["gathered"][0], *results["gathered"][1]), (results["strided"][0], *results["strided"][1])):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # "split": the rule counts the largest group's heads (8 heads over 3 groups: 3, 3, 2)
    monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", B * N * 3 * D)
    split = DilatedCall(q, k, v, DilatedConfig(seg, rates, "split"), True, mask, D**-0.5, 0.0)
    assert sdpa_backend.executor(split)[0] == "gathered"
    monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", B * N * 3 * D - 1)
    assert sdpa_backend.executor(split)[0] == "strided"
    packed = DilatedCall(q[:1], k[:1], v[:1], DilatedConfig(seg, rates), False, None, 1.0, 0.0, torch.tensor([0, N]))
    name, why = sdpa_backend.executor(packed)
    assert name == "packed"
    # which route the other segments take, and why (float64: not the strided-rows kernels)
    assert "gathered varlen calls" in why and "torch.float64" in why


@pytest.mark.parametrize("mode", ["all", "split"])
def test_one_attention_call_per_group(monkeypatch, mode):
    # the point of the executor: a fixed number of calls per group, not one per (group, offset)
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = sdpa_ops.attention_forward, sdpa_ops.attention_backward

    def count_fwd(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def count_bwd(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(sdpa_ops, "attention_forward", count_fwd)
    monkeypatch.setattr(sdpa_ops, "attention_backward", count_bwd)
    q, k, v = _inputs(1, 128, 16, 4, 8, torch.float32)
    seg, rates = [16, 32, 64, 128], [1, 2, 4, 8]
    _run(q, k, v, seg, rates, causal=True, mode=mode)
    assert calls == {"fwd": 4, "bwd": 4}
    monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", 0)
    calls.update(fwd=0, bwd=0)
    _run(q, k, v, seg, rates, causal=True, mode=mode)
    per_offset = 1 + 2 + 4 + 8 if mode == "all" else 1 + 2 + 4 + 4  # split: 4 heads per group, offsets h mod r
    assert calls == {"fwd": per_offset, "bwd": per_offset}


def test_non_contiguous_inputs_and_expanded_grad(executor):
    B, N, H, D = 2, 32, 4, 8
    base = [torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)  # (B, N, H, D) views of (B, H, N, D)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], backend="sdpa")
    r, _ = reference.dilated_attention(q, k, v, [8, 16], [1, 2])
    assert_close_to_reference("out", out, r)
    grads = torch.autograd.grad(out.sum(), (q, k, v))  # a stride-0 grad_output
    r_grads = torch.autograd.grad(r.sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close_to_reference(name, a, b)


def test_gradcheck_float64():
    q, k, v = _inputs(1, 12, 4, 2, 3, torch.float64, seed=11)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 3] = True
    assert gathered_groups.gathered_plan((1, 12, 4, 2, 3), DilatedConfig([4, 12], [1, 2]), True, CPU).gathers

    def f(q, k, v):
        return dilated_attention(q, k, v, [4, 12], [1, 2], is_causal=True, key_padding_mask=mask, backend="sdpa")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("shape", [(2, 40, 6, 2, 4), (1, 53, 8, 1, 4), (3, 40, 5, 5, 2)])
@pytest.mark.parametrize("mode", ["all", "split"])
def test_plan_covers_the_config_once(shape, mode):
    # gathered (offset, head) pairs plus strided pieces select exactly the reference's key multiset
    _, N, H, Hkv, _ = shape
    cfg = DilatedConfig([8, 16, 40], [1, 2, 4], mode)
    plan = gathered_groups.gathered_plan(shape, cfg, True, CPU)
    assert plan is not None and plan.gathers
    weights = torch.zeros(H, N, N, dtype=torch.float64)
    for step in plan.steps:
        for p in step.pieces:
            if p.batch not in (None, 0):
                continue
            for m in range(p.nseg):
                pos = torch.tensor([p.start + m * p.seg_stride + t * p.row_stride for t in range(p.rows)])
                for i in range(p.q_hn):
                    weights[p.q_h0 + i * p.q_hs][pos[:, None], pos[None, :]] += 1
        grp = step.gathered
        if grp is None:
            continue
        n, ns, c = grp.num_heads, grp.num_slots, grp.heads_per_slot
        assert n == ns * c and grp.q_columns.tolist() == [
            o * H + h for o, h in zip(grp.q_offsets.tolist(), grp.q_heads.tolist())
        ]
        # query head i reads slot i // c: the same offset, and the kv head GQA gives it
        for i, (o, h) in enumerate(zip(grp.q_offsets.tolist(), grp.q_heads.tolist())):
            assert grp.kv_offsets[i // c] == o and grp.kv_heads[i // c] == h // (H // Hkv)
        # each layer's slots are distinct rows of dk, dv (no racing index_add_)
        assert grp.layers[0][0] == 0 and grp.layers[-1][1] == ns
        for start, stop in grp.layers:
            cols = grp.kv_columns[start:stop].tolist()
            assert len(set(cols)) == len(cols)
        for s in range(grp.segments):
            for o, h in zip(grp.q_offsets.tolist(), grp.q_heads.tolist()):
                pos = s * grp.segment_length + o + grp.rate * torch.arange(grp.rows)
                weights[h][pos[:, None], pos[None, :]] += 1
    assert torch.equal(weights, reference.dilated_weights(N, H, [8, 16, 40], [1, 2, 4], head_mode=mode))


def test_uneven_slot_sharing_is_layered():
    # H=6, Hkv=2, r=2: kv head 0 serves heads 0, 2 (offset 0) and 1 (offset 1) -> 1 head per slot, 2 layers
    plan = gathered_groups.gathered_plan((1, 16, 6, 2, 4), DilatedConfig([16], [2]), True, CPU)
    (step,) = plan.steps
    grp = step.gathered
    assert grp.heads_per_slot == 1 and grp.num_slots == 6 and len(grp.layers) == 2
    # H=8, Hkv=2, r=2: every (offset, kv head) pair has 2 heads -> 2 heads per slot, one layer, K/V not repeated
    grp = gathered_groups.gathered_plan((1, 16, 8, 2, 4), DilatedConfig([16], [2]), True, CPU).steps[0].gathered
    assert grp.heads_per_slot == 2 and grp.num_slots == 4 and grp.layers == ((0, 4),)


def test_strided_groups_and_short_segments_stay_strided():
    # r = 1 (one head run): one strided call, no gather; N % w != 0: the short segment is strided pieces
    plan = gathered_groups.gathered_plan((1, 50, 4, 2, 4), DilatedConfig([8, 16, 64], [1, 2, 4]), True, CPU)
    r1, r2, r4 = plan.steps
    assert r1.gathered is None and {p.group for p in r1.pieces} == {0}
    assert r2.gathered is not None and all(p.start >= 48 for p in r2.pieces) and len(r2.pieces) == 2
    # w = 64 > N = 50 clamps to 52, no full segment: strided only
    assert r4.gathered is None and len(r4.pieces) == 4


def test_plan_cache_is_bounded_and_capture_never_builds(monkeypatch):
    cfg = DilatedConfig([8, 16], [1, 2])
    first = gathered_groups.gathered_plan((1, 32, 4, 2, 8), cfg, True, CPU)
    assert gathered_groups.gathered_plan((1, 32, 4, 2, 8), DilatedConfig([8, 16], [1, 2]), True, CPU) is first
    monkeypatch.setattr(gathered_groups, "stream_capturing", lambda device: True)
    # while capturing: a cached plan is used, a missing one is not built (strided executor instead)
    assert gathered_groups.gathered_plan((1, 32, 4, 2, 8), cfg, True, CPU) is first
    assert gathered_groups.gathered_plan((1, 33, 4, 2, 8), cfg, True, CPU) is None
    monkeypatch.undo()
    monkeypatch.setattr(gathered_groups._PLANS, "max_entries", 2)
    for n in (34, 35, 36):
        gathered_groups.gathered_plan((1, n, 4, 2, 8), cfg, True, CPU)
    assert gathered_groups.gathered_plan((1, 32, 4, 2, 8), cfg, True, CPU) is not first  # dropped, rebuilt


def test_call_budget_is_validated():
    with pytest.raises(ValueError, match="call_budget"):
        views.plan_pieces((1, 8, 2, 2, 4), DilatedConfig([4], [1]), True, call_budget=0)


def test_strided_executor_with_chunked_calls(monkeypatch):
    # small test shapes now take the gathered executor: keep the strided one's chunked calls covered
    monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", 0)
    monkeypatch.setattr(views, "MIN_CALL_ELEMS", 1)
    monkeypatch.setattr(views, "CALL_FRACTION", 64)
    pieces = views.plan_pieces((2, 96, 4, 2, 8), DilatedConfig([8, 32], [1, 4]), True)
    assert any(p.batch is not None and p.nseg < 96 // p.seg_stride for p in pieces)
    q, k, v = _inputs(2, 96, 4, 2, 8, torch.float64, seed=2)
    _check(q, k, v, [8, 32], [1, 4], causal=True)
