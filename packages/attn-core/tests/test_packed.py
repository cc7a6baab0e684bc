"""Packed documents (cu_seqlens): validation, the float64 references, and the backends (the sdpa
backend's own cases are in test_packed_sdpa.py).

The contract: attention over documents packed along N with cu_seqlens equals the same attention
run on each document alone, concatenated (segments, offsets, causal masks and windows start at
each document's start; no query sees another document's keys). Checked on fresh random inputs,
outputs and dq/dk/dv, against the float64 references applied per document.
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_core import dilated_attention, explain, last_backend, reference
from attn_core.packing import document_positions
from attn_core.testing import assert_close_to_reference
from attn_core.validation import check_cu_seqlens


def _cu(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out


def _docs(cu: torch.Tensor) -> list[tuple[int, int]]:
    offsets = cu.tolist()
    return list(itertools.pairwise(offsets))


def _inputs(N, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(1, N, H, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def _run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    if not out.requires_grad:  # the float64 reference on an empty sequence builds no graph
        return out.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, leaves)]


def _per_document(fn, q, k, v, dout, cu, mask=None):
    """fn run on each document alone (its slice of q, k, v and of the padding mask), concatenated."""

    def packed(a, b, c):
        parts = []
        for s, e in _docs(cu):
            m = None if mask is None else mask[:, s:e]
            parts.append(fn(a[:, s:e], b[:, s:e], c[:, s:e], m))
        return torch.cat(parts, dim=1)

    return _run(packed, q, k, v, dout)


# Lengths with segments (4, 8): 1 token, shorter than the smallest segment, exactly a segment,
# longer than the largest, empty documents (also first and last), odd lengths.
LENGTHS = [0, 1, 3, 4, 0, 8, 19, 5, 13, 0]
# (segment_lengths, dilation_rates, H, Hkv, D)
CONFIGS = {
    "classic": ([4, 8], [1, 2], 4, 4, 8),
    "three_groups_gqa": ([3, 6, 12], [1, 2, 4], 6, 3, 4),
    "mqa_unselected_positions": ([4, 8], [2, 4], 5, 1, 4),
}


# --- validation ------------------------------------------------------------------------------


def test_valid_offsets_pass_unchanged_including_empty_documents():
    cu = _cu([3, 0, 0, 2])
    assert check_cu_seqlens(cu, batch=1, seq_len=5, device=torch.device("cpu")) is cu
    no_docs = torch.zeros(1, dtype=torch.int32)  # N == 0, no document
    check_cu_seqlens(no_docs, batch=1, seq_len=0, device=torch.device("cpu"))
    only_empty = torch.zeros(3, dtype=torch.int32)
    check_cu_seqlens(only_empty, batch=1, seq_len=0, device=torch.device("cpu"))


BAD_OFFSETS = {
    "non_monotone": (torch.tensor([0, 5, 3, 8], dtype=torch.int32), 1, 8, r"cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
    "int64": (torch.tensor([0, 8]), 1, 8, r"torch\.int32.*got torch\.int64"),
    "float": (torch.tensor([0.0, 8.0]), 1, 8, r"torch\.int32.*got torch\.float32"),
    "wrong_end": (torch.tensor([0, 3, 7], dtype=torch.int32), 1, 8, r"N = 8.*cu_seqlens\[-1\] = 7"),
    "past_end": (torch.tensor([0, 3, 9], dtype=torch.int32), 1, 8, r"N = 8.*cu_seqlens\[-1\] = 9"),
    "batch_2": (torch.tensor([0, 8], dtype=torch.int32), 2, 8, r"B == 1.*B=2"),
    "negative": (torch.tensor([0, -2, 8], dtype=torch.int32), 1, 8, r"non-negative.*cu_seqlens\[1\] = -2"),
    "bad_start": (torch.tensor([2, 8], dtype=torch.int32), 1, 8, r"start at 0.*cu_seqlens\[0\] = 2"),
    "two_dims": (torch.tensor([[0, 8]], dtype=torch.int32), 1, 8, r"1-D.*\(1, 2\)"),
    "empty": (torch.zeros(0, dtype=torch.int32), 1, 0, r"at least one entry.*\(0,\)"),
    "other_device": (torch.zeros(2, dtype=torch.int32, device="meta"), 1, 8, r"on cpu like q.*meta"),
}


@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_bad_offsets_raise_value_error_naming_the_value(case):
    cu, batch, seq_len, match = BAD_OFFSETS[case]
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(cu, batch=batch, seq_len=seq_len, device=torch.device("cpu"))
    # ...and every entry point says the same
    q = torch.randn(batch, seq_len, 2, 4)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, q, q, [4], [1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        explain(q, q, q, [4], [1], cu_seqlens=cu)


def test_offsets_that_are_not_a_tensor_raise_type_error():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError, match=r"cu_seqlens must be a torch\.Tensor.*list"):
        dilated_attention(q, q, q, [4], [1], cu_seqlens=[0, 8])


def test_document_positions_restart_at_each_document():
    cu = _cu([3, 0, 2, 1, 0])
    doc_ids, pos = document_positions(cu, 6)
    assert doc_ids.tolist() == [0, 0, 0, 2, 2, 3]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0]


# --- references ------------------------------------------------------------------------------


def test_document_mask_matches_brute_force():
    cu = _cu([0, 5, 1, 0, 7, 3])
    N = 16
    for causal in (False, True):
        for window in (None, (2, 1), (-1, 0), (0, -1), (3, -1)):
            mask = reference.document_mask(N, N, cu_seqlens=cu, is_causal=causal, window_size=window)
            doc_ids, _ = document_positions(cu, N)
            for i in range(N):
                for j in range(N):
                    ok = bool(doc_ids[i] == doc_ids[j]) and (not causal or j <= i)
                    if window is not None:
                        left, right = window
                        ok = ok and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                    assert bool(mask[i, j]) == ok, (causal, window, i, j)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (3, 2), (2, -1)])
@pytest.mark.parametrize("padding", [False, True])
def test_dense_reference_equals_per_document_runs(causal, window, padding):
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    q, k, v, _ = _inputs(N, 4, 2, 8, torch.float64, 5)
    mask = None
    if padding:
        mask = torch.rand(1, N, generator=torch.Generator().manual_seed(3)) < 0.3
        mask[0, 8:16] = True  # a fully padded document (length 8): its rows see no key
    out, lse = reference.dense_attention(
        q, k, v, is_causal=causal, window_size=window, key_padding_mask=mask, cu_seqlens=cu
    )
    for s, e in _docs(cu):
        m = None if mask is None else mask[:, s:e]
        o, l_ = reference.dense_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], is_causal=causal, window_size=window, key_padding_mask=m
        )
        torch.testing.assert_close(out[:, s:e], o, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[..., s:e], l_, rtol=0, atol=1e-12)
    if padding:
        assert torch.equal(out[0, 8:16], torch.zeros_like(out[0, 8:16]))
        assert torch.isneginf(lse[0, :, 8:16]).all()


def test_dense_reference_window_counts_within_the_document():
    # one document starting at 5: its first query sees only itself under a causal (2, 0) window,
    # never the previous document's last keys
    cu = _cu([5, 6])
    q, k, v, _ = _inputs(11, 1, 1, 4, torch.float64, 8)
    _, lse = reference.dense_attention(q, k, v, is_causal=True, window_size=(2, 0), cu_seqlens=cu)
    scale = 4**-0.5
    assert torch.allclose(lse[0, 0, 5], (q[0, 5, 0] @ k[0, 5, 0]) * scale)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_reference_equals_per_document_runs(config, head_mode, causal):
    seg, rates, H, Hkv, D = CONFIGS[config]
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    q, k, v, _ = _inputs(N, H, Hkv, D, torch.float64, 9)
    kw = {"is_causal": causal, "head_mode": head_mode}
    out, lse = reference.dilated_attention(q, k, v, seg, rates, cu_seqlens=cu, **kw)
    for s, e in _docs(cu):
        o, l_ = reference.dilated_attention(q[:, s:e], k[:, s:e], v[:, s:e], seg, rates, **kw)
        torch.testing.assert_close(out[:, s:e], o, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[..., s:e], l_, rtol=0, atol=1e-12)


def test_references_refuse_packed_batches():
    q = torch.randn(2, 4, 1, 2, dtype=torch.float64)
    cu = _cu([4])
    with pytest.raises(ValueError, match="B == 1"):
        reference.dense_attention(q, q, q, cu_seqlens=cu)
    with pytest.raises(ValueError, match="B == 1"):
        reference.dilated_attention(q, q, q, [2], [1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="window_size"):
        reference.document_mask(4, 4, window_size=(-2, 1))


# --- the backend -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_matches_float64_reference_per_document(config, head_mode, causal, padding, dtype):
    seg, rates, H, Hkv, D = CONFIGS[config]
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    seed = zlib.crc32(f"{config}-{head_mode}-{causal}-{padding}-{dtype}".encode())
    q, k, v, dout = _inputs(N, H, Hkv, D, dtype, seed)
    mask = None
    if padding:
        mask = torch.rand(1, N, generator=torch.Generator().manual_seed(seed)) < 0.3
        mask[0, 8:16] = True  # the document of length 8 is fully padded
    kw = {"is_causal": causal, "head_mode": head_mode}

    out, grads = _run(
        lambda a, b, c: dilated_attention(
            a, b, c, seg, rates, key_padding_mask=mask, cu_seqlens=cu, backend="reference", **kw
        ),
        q,
        k,
        v,
        dout,
    )
    assert last_backend() == "reference"
    ref_out, ref_grads = _per_document(
        lambda a, b, c, m: reference.dilated_attention(a, b, c, seg, rates, key_padding_mask=m, **kw)[0],
        q,
        k,
        v,
        dout,
        cu,
        mask,
    )
    base_out, base_grads = None, [None, None, None]
    if dtype != torch.float64:  # plain PyTorch in the same dtype: the tolerance rule's baseline
        base_out, base_grads = _per_document(
            lambda a, b, c, m: reference.dilated_attention(a, b, c, seg, rates, key_padding_mask=m, dtype=dtype, **kw)[
                0
            ],
            q,
            k,
            v,
            dout,
            cu,
            mask,
        )
    assert out.dtype == dtype and out.shape == (1, N, H, D)
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        assert_close_to_reference(name, got, ref, base)
    if padding:
        assert torch.equal(out[0, 8:16], torch.zeros_like(out[0, 8:16])), "fully padded document must output 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_low_precision_within_twice_plain_pytorch(dtype):
    seg, rates, H, Hkv, D = CONFIGS["three_groups_gqa"]
    cu = _cu(LENGTHS)
    q, k, v, dout = _inputs(int(cu[-1]), H, Hkv, D, dtype, 17)
    kw = {"is_causal": True}
    out, grads = _run(lambda a, b, c: dilated_attention(a, b, c, seg, rates, cu_seqlens=cu, **kw), q, k, v, dout)
    ref_out, ref_grads = _run(
        lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, cu_seqlens=cu, **kw)[0], q, k, v, dout
    )
    base_out, base_grads = _run(
        lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, cu_seqlens=cu, dtype=dtype, **kw)[0].to(dtype),
        q,
        k,
        v,
        dout,
    )
    assert out.dtype == dtype
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_close_to_reference(name, got, ref, base)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_concatenated_per_document_calls(causal):
    """dilated_attention(packed) == cat(dilated_attention(doc_i)): outputs and gradients."""
    seg, rates, H, Hkv, D = CONFIGS["three_groups_gqa"]
    cu = _cu(LENGTHS)
    q, k, v, dout = _inputs(int(cu[-1]), H, Hkv, D, torch.float64, 23)
    out, grads = _run(
        lambda a, b, c: dilated_attention(a, b, c, seg, rates, is_causal=causal, cu_seqlens=cu), q, k, v, dout
    )
    cat_out, cat_grads = _per_document(
        lambda a, b, c, m: dilated_attention(a, b, c, seg, rates, is_causal=causal), q, k, v, dout, cu
    )
    assert_close_to_reference("out", out, cat_out)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, cat_grads):
        assert_close_to_reference(name, got, ref)


def test_many_tiny_documents():
    # 500 documents of 0..4 tokens (plus one longer than every segment): no per-document work
    g = torch.Generator().manual_seed(31)
    lengths = [*torch.randint(0, 5, (500,), generator=g).tolist(), 40]
    cu = _cu(lengths)
    seg, rates = [4, 8, 16], [1, 2, 4]
    q, k, v, dout = _inputs(int(cu[-1]), 4, 2, 8, torch.float64, 37)
    for causal in (False, True):
        kw = {"is_causal": causal}
        out, grads = _run(
            lambda a, b, c, kw=kw: dilated_attention(a, b, c, seg, rates, cu_seqlens=cu, **kw), q, k, v, dout
        )
        ref_out, ref_grads = _per_document(
            lambda a, b, c, m, kw=kw: reference.dilated_attention(a, b, c, seg, rates, **kw)[0], q, k, v, dout, cu
        )
        assert_close_to_reference("out", out, ref_out)
        for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close_to_reference(name, got, ref)


def test_packed_detects_a_leak_across_documents():
    # the comparison can fail: attention over the unpacked sequence differs from the packed one
    seg, rates, H, Hkv, D = CONFIGS["classic"]
    cu = _cu([3, 5, 8])
    q, k, v, _ = _inputs(16, H, Hkv, D, torch.float64, 41)
    packed = dilated_attention(q, k, v, seg, rates, cu_seqlens=cu)
    whole = dilated_attention(q, k, v, seg, rates)
    assert (packed - whole).abs().max() > 1e-3


def test_dropout_never_crosses_documents():
    seg, rates, H, Hkv, D = CONFIGS["classic"]
    cu = _cu([6, 10])
    q, k, v, _ = _inputs(16, H, Hkv, D, torch.float64, 43)
    k = k.clone().requires_grad_(True)
    torch.manual_seed(0)
    out = dilated_attention(q, k, v, seg, rates, dropout_p=0.4, cu_seqlens=cu)
    assert torch.isfinite(out).all()
    (grad_k,) = torch.autograd.grad(out[:, :6].sum(), k)
    assert torch.equal(grad_k[:, 6:], torch.zeros_like(grad_k[:, 6:])), "document 0 read document 1's keys"
    assert grad_k[:, :6].abs().sum() > 0


def test_only_empty_documents_and_empty_sequence():
    q = torch.randn(1, 0, 2, 4, requires_grad=True)
    out = dilated_attention(q, q, q, [4], [1], cu_seqlens=torch.zeros(4, dtype=torch.int32))
    assert out.shape == (1, 0, 2, 4)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_both_backends_take_packed_calls_and_auto_picks_sdpa():
    q = torch.randn(1, 16, 2, 8)
    cu = _cu([7, 9])
    assert explain(q, q, q, [4, 8], [1, 2], cu_seqlens=cu).backend == "sdpa"
    outs = {}
    for backend in ("reference", "sdpa"):
        outs[backend] = dilated_attention(q, q, q, [4, 8], [1, 2], cu_seqlens=cu, backend=backend)
        assert last_backend() == backend
    assert_close_to_reference("out", outs["sdpa"], outs["reference"].double(), outs["reference"])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("head_mode", ["all", "split"])
def test_packed_gradcheck_float64(head_mode, backend):
    g = torch.Generator().manual_seed(47)
    cu = _cu([3, 0, 1, 6])
    q = torch.randn(1, 10, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 10, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 10, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 5] = True

    def fn(a, b, c):
        return dilated_attention(
            a, b, c, [2, 4], [1, 2], is_causal=True, key_padding_mask=mask, head_mode=head_mode, cu_seqlens=cu,
            backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_padded_keys_values_are_never_read_when_packed(backend):
    seg, rates, H, Hkv, D = CONFIGS["three_groups_gqa"]
    cu = _cu(LENGTHS)
    N = int(cu[-1])
    q, k, v, _ = _inputs(N, H, Hkv, D, torch.float32, 53)
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, 2::5] = True
    kw = {"key_padding_mask": mask, "cu_seqlens": cu, "backend": backend}
    clean = dilated_attention(q, k, v, seg, rates, **kw)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[mask], v_bad[mask] = float("nan"), float("inf")
    leaves = [t.requires_grad_(True) for t in (q.clone(), k_bad, v_bad)]
    out = dilated_attention(*leaves, seg, rates, **kw)
    assert torch.equal(out, clean)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(grads[1][mask], torch.zeros_like(grads[1][mask]))


# derandomized like test_properties.py: CI runs the same examples (HYPOTHESIS_EXAMPLES widens locally)
_EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "30"))


@settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize="HYPOTHESIS_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    lengths=st.lists(st.integers(0, 14), min_size=1, max_size=6),
    rates=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seg_mult=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    causal=st.booleans(),
    head_mode=st.sampled_from(["all", "split"]),
    padded=st.booleans(),
    backend=st.sampled_from(["reference", "sdpa"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_packings_match_per_document_reference(
    lengths, rates, seg_mult, kv_heads, group, causal, head_mode, padded, backend, seed
):
    segs = [r * (seg_mult + i) for i, r in enumerate(rates)]
    cu = _cu(lengths)
    N = int(cu[-1])
    q, k, v, dout = _inputs(N, kv_heads * group, kv_heads, 4, torch.float64, seed)
    mask = torch.rand(1, N, generator=torch.Generator().manual_seed(seed)) < 0.3 if padded else None
    kw = {"is_causal": causal, "head_mode": head_mode}
    out, grads = _run(
        lambda a, b, c: dilated_attention(
            a, b, c, segs, rates, key_padding_mask=mask, cu_seqlens=cu, backend=backend, **kw
        ),
        q,
        k,
        v,
        dout,
    )
    ref_out, ref_grads = _per_document(
        lambda a, b, c, m: reference.dilated_attention(a, b, c, segs, rates, key_padding_mask=m, **kw)[0],
        q,
        k,
        v,
        dout,
        cu,
        mask,
    )
    assert_close_to_reference("out", out, ref_out)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, got, ref)
