"""Hostile inputs to the dilated-attention backends and primitives, against the float64 reference.

- Segment lengths and dilation rates far beyond N (2**40, 2**63 - 1): bounded work (torch ops and
  Python lines counted, a budget raises), the same plan and result as the values clamped to N.
- Logits of magnitude 1e6 (fp32) and fp16/bf16 inputs near their range: outputs stay normalised
  (q = k constant, v = 1 gives exactly 1), gradients match the reference.
- NaN / inf in the k and v of padded keys: never read (outputs and gradients finite, equal to the
  clean inputs' results, gradient 0 at padded keys) on every backend and the block math path.
- Double backward: the sdpa backend says it does not support it; the reference backend does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attn_core import dilated_attention, merge_into_, merge_partials, reference, views
from attn_core.blocks import block_backward, block_forward
from attn_core.config import DilatedConfig
from attn_core.testing import assert_close_to_reference

BACKENDS = ("sdpa", "reference")
ATTN_CORE_DIR = os.path.dirname(sys.modules["attn_core"].__file__ or "")


class WorkBudgetExceeded(Exception):
    pass


class _OpBudget(TorchDispatchMode):
    """Counts every torch op dispatched; more than ``limit`` raises (work must follow N, not w or r)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.count, self.limit = 0, limit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        if self.count > self.limit:
            raise WorkBudgetExceeded(f"more than {self.limit} torch ops")
        return func(*args, **(kwargs or {}))


@contextmanager
def bounded_work(max_ops: int = 3000, max_lines: int = 50_000) -> Iterator[None]:
    """Raise WorkBudgetExceeded when the block runs more torch ops or attn_core source lines than allowed.

    Deterministic (counts, not time): a loop over range(r) with r = 2**40 fails here at once.
    """
    lines = 0

    def local(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines > max_lines:
                raise WorkBudgetExceeded(f"more than {max_lines} lines of attn_core run")
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        return local if frame.f_code.co_filename.startswith(ATTN_CORE_DIR) else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with _OpBudget(max_ops):
            yield
    finally:
        sys.settrace(previous)


def _qkv(B, N, H, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g, dtype=torch.float64).to(dtype) for h in (H, Hkv, Hkv)]


def _out_and_grads(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


# ---- 1. segment lengths and rates beyond N ----------------------------------------------------------

HUGE = {
    "rate_1e6": ([10**6], [10**6]),
    "both_2_40": ([2**40], [2**40]),
    "max_int64_segment": ([2**63 - 1], [1]),
    "mixed": ([4, 2**40, 2**62], [1, 2**20, 2**31]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HUGE))
@pytest.mark.parametrize(("N", "causal", "padded"), [(16, False, False), (16, True, True), (3, False, False)])
def test_huge_segments_and_rates_are_bounded_and_exact(backend, case, N, causal, padded) -> None:
    """w, r >> N: bounded work, result and gradients equal to the float64 reference.

    N = 3 with 4 heads and a rate > 3: head 3's offset 3 selects no position (out 0).
    """
    seg, rates = HUGE[case]
    B, H, Hkv, D = 2, 4, 2, 8
    q, k, v = _qkv(B, N, H, Hkv, D, seed=N)
    dout = torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask[1, ::3] = True

    def run(q, k, v):
        return dilated_attention(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, backend=backend)

    with bounded_work():
        out, grads = _out_and_grads(run, q, k, v, dout)
    ref, ref_grads = _out_and_grads(
        lambda q, k, v: reference.dilated_attention(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask)[0],
        q.double(),
        k.double(),
        v.double(),
        dout.double(),
    )
    assert_close_to_reference(f"{backend} {case} out", out, ref)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close_to_reference(f"{backend} {case} d{name}", g, rg)
    if N == 3 and all(r > N for r in rates):
        assert torch.all(out[:, :, 3] == 0)


@pytest.mark.parametrize("case", list(HUGE))
def test_plan_of_huge_values_equals_plan_of_clamped_values(case) -> None:
    """The sdpa planner plans (w, r) clamped to N: as many pieces as for w, r <= N, at most one per (group, head)."""
    seg, rates = HUGE[case]
    B, N, H, Hkv, D = 2, 16, 4, 2, 8
    cfg = DilatedConfig(seg, rates)
    clamped = [cfg.group_extent(g, N) for g in range(cfg.num_groups)]
    assert all(w <= 2 * N and r <= N and w % r == 0 for w, r in clamped)
    with bounded_work(max_ops=0):
        pieces = views.plan_pieces((B, N, H, Hkv, D), cfg, True)
    # rates <= 2**31 keep every head's offset j mod r = j, as with a rate of N = 16
    same = DilatedConfig([w for w, _ in clamped], [r for _, r in clamped])
    assert pieces == views.plan_pieces((B, N, H, Hkv, D), same, True)
    assert 0 < len(pieces) <= cfg.num_groups * H * 2  # full segments and the short tail, per head


def test_float64_reference_weights_of_huge_values() -> None:
    for seg, rates in HUGE.values():
        with bounded_work(max_ops=2000):
            weights = reference.dilated_weights(16, 4, seg, rates)
        cfg = DilatedConfig(seg, rates)
        clamped = [cfg.group_extent(g, 16) for g in range(cfg.num_groups)]
        expect = reference.dilated_weights(16, 4, [w for w, _ in clamped], [r for _, r in clamped])
        assert torch.equal(weights, expect)


def test_offsets_at_or_past_n_select_nothing() -> None:
    cfg = DilatedConfig([8], [8])
    assert cfg.heads_by_offset(0, 6, 3) == ((0, (0,)), (1, (1,)), (2, (2,)))  # heads 3..5: offsets >= N
    assert cfg.group_extent(0, 3) == (3, 3)
    assert DilatedConfig([2**40], [4]).group_extent(0, 10) == (12, 4)
    assert DilatedConfig([8], [2]).group_extent(0, 100) == (8, 2)
    assert DilatedConfig([8], [2]).heads_by_offset(0, 4, 0) == ()


def test_values_past_int64_are_refused() -> None:
    with pytest.raises(ValueError, match=r"at most 2\*\*63 - 1, got 9223372036854775808"):
        DilatedConfig([2**63], [1])
    with pytest.raises(ValueError, match="not divisible"):  # a rate past int64 divides no allowed length
        DilatedConfig([2**63 - 1], [2**64])


# ---- 2. large logits -----------------------------------------------------------------------------------

# (dtype, value of every q and k entry): logits value**2 * D * scale = value**2 * sqrt(D)
LARGE = {
    "fp32_1e6": (torch.float32, (1e6 / 2) ** 0.5),  # D = 4: logits 1e6
    "fp16_60000": (torch.float16, 60000.0),
    "bf16_3e38": (torch.bfloat16, 3e18),  # logits ~1e37, near the fp32 range
}


def _constant_inputs(dtype, value, B=2, N=16, H=4, Hkv=2, D=4):
    q = torch.full((B, N, H, D), value, dtype=dtype)
    k = torch.full((B, N, Hkv, D), value, dtype=dtype)
    v = torch.ones(B, N, Hkv, D, dtype=dtype)
    return q, k, v


def _assert_ones(out: torch.Tensor, name: str) -> None:
    """Every entry 1 up to a few roundings of out's dtype (unnormalised weights were off by up to 3%)."""
    err = float((out.double() - 1).abs().max())
    assert err <= 4 * torch.finfo(out.dtype).eps, f"{name}: max |out - 1| = {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize(("seg", "rates"), [([8], [1]), ([4, 8, 16], [1, 2, 4])])
def test_large_logits_stay_normalised(backend, case, seg, rates) -> None:
    dtype, value = LARGE[case]
    q, k, v = _constant_inputs(dtype, value)
    for causal in (False, True):
        out = dilated_attention(q, k, v, seg, rates, is_causal=causal, backend=backend)
        _assert_ones(out, f"{backend} {case} causal={causal}")


@pytest.mark.parametrize("case", ["fp32_1e6", "fp16_60000"])
def test_reference_backend_gradients_at_large_logits(case) -> None:
    """Gradients by autograd through the max-subtracted softmax and the normalised merge: as the reference's."""
    dtype, value = LARGE[case]
    q, k, v = _constant_inputs(dtype, value)
    v = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    seg, rates = [4, 8], [1, 2]

    def run(q, k, v):
        return dilated_attention(q, k, v, seg, rates, backend="reference")

    out, grads = _out_and_grads(run, q, k, v, dout)
    ref, ref_grads = _out_and_grads(
        lambda q, k, v: reference.dilated_attention(q, k, v, seg, rates)[0], q.double(), k.double(), v.double(), dout
    )
    assert_close_to_reference("out", out, ref)
    # dv is p^T dout with p = 1/n of each row's keys: exact up to the sums' rounding
    assert_close_to_reference("dv", grads[2], ref_grads[2])


@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize("padded", [False, True])
def test_block_math_path_at_large_logits(case, padded) -> None:
    """block_forward gives 1; block_backward with the block's own (out, lse) is exact (p normalised)."""
    dtype, value = LARGE[case]
    q, k, v = _constant_inputs(dtype, value, N=12)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.zeros(2, 12, dtype=torch.bool)
        mask[0, 5:] = True
    for causal in (False, True):
        out, lse = block_forward(q, k, v, is_causal=causal, softmax_scale=0.5, key_padding_mask=mask)
        _assert_ones(out, f"{case} causal={causal}")
        dq, dk, dv = block_backward(
            dout.to(dtype), q, k, v, out, lse, is_causal=causal, softmax_scale=0.5, key_padding_mask=mask
        )
        ref_args = [t.double().requires_grad_() for t in (q, k, v)]
        ref, _ = reference.dense_attention(*ref_args, is_causal=causal, key_padding_mask=mask, softmax_scale=0.5)
        _, _, ref_dv = torch.autograd.grad(ref, ref_args, dout.to(dtype).double())
        assert_close_to_reference("dv", dv, ref_dv)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_merge_weights_stay_normalised_at_large_lse() -> None:
    """Two equal partials at lse ~1e6 (fp32): the merge gives the partial back exactly, lse + log 2."""
    out = torch.ones(1, 5, 2, 3)
    lse = torch.full((1, 2, 5), 1e6 + 2.7725887)
    merged, L = merge_partials([out, out], [lse, lse])
    assert torch.equal(merged, out)
    torch.testing.assert_close(L, lse + 0.6931472, rtol=0, atol=0.07)  # one fp32 ulp at 1e6 is 0.0625
    acc, acc_lse = out.clone(), lse.clone()
    merge_into_(acc, acc_lse, out, lse)
    assert torch.equal(acc, out)


# ---- 4. non-finite values at padded keys ---------------------------------------------------------------


def _poisoned(k, v, mask, fill):
    k, v = k.clone(), v.clone()
    k[mask] = fill
    v[mask] = fill
    return k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_values_are_never_read(backend, fill, dtype, causal) -> None:
    B, N, H, Hkv, D = 2, 14, 4, 2, 8
    q, k, v = _qkv(B, N, H, Hkv, D, dtype=dtype, seed=11)
    dout = torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, ::2] = True
    k_bad, v_bad = _poisoned(k, v, mask, fill)
    seg, rates = [4, 8], [1, 2]

    def run(q, k, v):
        return dilated_attention(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask, backend=backend)

    def run_reference(q, k, v):
        return reference.dilated_attention(q, k, v, seg, rates, is_causal=causal, key_padding_mask=mask)[0]

    out, (dq, dk, dv) = _out_and_grads(run, q, k_bad, v_bad, dout)
    ref, ref_grads = _out_and_grads(run_reference, q.double(), k.double(), v.double(), dout.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert_close_to_reference(f"{backend} out", out, ref)
    for name, g, rg in zip("qkv", (dq, dk, dv), ref_grads):
        assert_close_to_reference(f"{backend} d{name}", g, rg)
    assert torch.all(dk[mask] == 0) and torch.all(dv[mask] == 0)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_padded_keys_values_are_never_read_by_blocks_and_reference(fill) -> None:
    B, N, H, Hkv, D = 2, 10, 4, 2, 8
    q, k, v = _qkv(B, N, H, Hkv, D, seed=12)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, :4] = True
    mask[1] = True  # a fully padded row: out 0, lse -inf
    k_bad, v_bad = _poisoned(k, v, mask, fill)
    dout = torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(3))
    out, lse = block_forward(q, k_bad, v_bad, softmax_scale=0.3, key_padding_mask=mask)
    grads = block_backward(dout, q, k_bad, v_bad, out, lse, softmax_scale=0.3, key_padding_mask=mask)
    ref_args = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference.dense_attention(*ref_args, key_padding_mask=mask, softmax_scale=0.3)
    ref_grads = torch.autograd.grad(ref, ref_args, dout.double())
    assert_close_to_reference("out", out, ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_close_to_reference(f"d{name}", g, rg)
    # the float64 reference itself reads no padded key
    bad_ref, _ = reference.dense_attention(q, k_bad, v_bad, key_padding_mask=mask, softmax_scale=0.3)
    torch.testing.assert_close(bad_ref, ref.detach())


# ---- 5. double backward ---------------------------------------------------------------------------------


def test_sdpa_backend_refuses_double_backward_clearly() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 12, 2, 2, 8, seed=4))
    out = dilated_attention(q, k, v, [4, 8], [1, 2], backend="sdpa")
    dq, dk = torch.autograd.grad(out.square().sum(), (q, k), create_graph=True)
    # first order is unchanged by create_graph
    dq1, dk1 = torch.autograd.grad(dilated_attention(q, k, v, [4, 8], [1, 2], backend="sdpa").square().sum(), (q, k))
    assert torch.equal(dq.detach(), dq1) and torch.equal(dk.detach(), dk1)
    with pytest.raises(RuntimeError, match=r"double backward .*not supported by the sdpa backend.*backend='reference'"):
        (dq.square().sum() + dk.sum()).backward()


def test_reference_backend_supports_double_backward() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 6, 2, 1, 4, dtype=torch.float64, seed=6))

    def fn(q, k, v):
        return dilated_attention(q, k, v, [2, 4], [1, 2], is_causal=True, backend="reference")

    assert torch.autograd.gradgradcheck(fn, (q, k, v))
