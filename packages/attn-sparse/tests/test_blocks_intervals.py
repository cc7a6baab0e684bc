"""attn_sparse.intervals.KeyIntervals and block_forward / block_backward with ``key_intervals``: the
token masks of a whole sequence (causal, windows, documents) applied to one sharded call whose
keys are any sorted set of positions, against the float64 reference (attn_core.reference), both
backends ("triton" in Triton's CPU interpreter, fp32/fp16 under the project's 2x rule).

The ranged test takes query rows [q0, N) of a block-sparse attention over N tokens with token
masks, and splits the keys into two interleaved sets of 16-token blocks (even and odd blocks:
neither is contiguous), as a ring splits them by owner: the two calls' outputs merged by LSE
must equal the full attention's rows, and their backward contributions must add up to its
gradients.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

# Kernels are decorated at import: the interpreter must be selected before attn_sparse.kernels loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from attn_core import reference
from attn_core.merge import merge_into_
from attn_core.testing import assert_close_to_reference
from attn_sparse import BlockLayout, block_backward, block_forward
from attn_sparse.intervals import KeyIntervals
from attn_sparse.masks import TokenMask

BS = 16
CPU = torch.device("cpu")


def triton_runs_here() -> bool:
    return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


def token_mask(N: int, causal: bool, window: tuple[int, int] | None, docs: list[int] | None) -> TokenMask:
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    return TokenMask.build(
        is_causal=causal, window_size=window, cu_seqlens=cu, batch=1, seq_len_q=N, seq_len_k=N, device=CPU
    )


# ------------------------------------------------------------------ KeyIntervals itself
MASKS = [
    (True, (20, -1), None),  # causal + window
    (False, (5, 7), [0, 1, 2, 30, 31, 60, 96]),  # window + documents, 1-token documents
    (True, None, [0, 17, 18, 50, 96]),  # causal documents
    (False, (0, 0), None),  # each query sees itself only
    (True, (200, 3), None),  # a window wider than the sequence
]


@pytest.mark.parametrize(("causal", "window", "docs"), MASKS)
def test_for_shard_maps_the_global_mask_and_query_bounds_are_exact(causal, window, docs) -> None:
    N, q0, nq = 96, 23, 50
    mask = token_mask(N, causal, window, docs)
    g = torch.Generator().manual_seed(N + q0)
    keys = torch.sort(torch.randperm(N, generator=g)[:41]).values  # non-contiguous sorted positions
    ki = KeyIntervals.for_shard(mask, N, q0, nq, keys)
    want = mask.dense(N, N)[q0 : q0 + nq][:, keys]
    assert ki.bounds.dtype == torch.int32 and ki.bounds.shape == (2, nq) and ki.num_keys == 41
    assert torch.equal(ki.dense(), want)
    KeyIntervals(ki.bounds, 41)  # what the mapping gives passes the validation
    qb = ki.query_bounds(45)  # 4 keys past num_keys: seen by none
    assert qb.dtype == torch.int32 and qb.shape == (2, 45) and qb.is_contiguous()
    i = torch.arange(nq)
    seen_by = (i[:, None] >= qb[0].long()) & (i[:, None] < qb[1].long())  # (Nq, Nk) from the key side
    assert torch.equal(seen_by[:, :41], want) and not seen_by[:, 41:].any()
    assert bool((qb[:, 1:] >= qb[:, :-1]).all())  # non-decreasing, as the kernels need
    causal_dense = ki.with_causal().dense()
    assert torch.equal(causal_dense, want & torch.ones(nq, 41, dtype=torch.bool).tril())


def test_key_intervals_validation_names_the_bad_value() -> None:
    good = torch.tensor([[0, 0, 1, 3], [1, 2, 2, 4]])
    assert KeyIntervals(good, 4).num_queries == 4
    KeyIntervals(torch.zeros(2, 0, dtype=torch.int32), 0)  # no queries
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        KeyIntervals([[0], [1]], 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.float32"):
        KeyIntervals(good.float(), 4)
    with pytest.raises(TypeError, match=r"torch\.bool"):
        KeyIntervals(good > 0, 4)
    with pytest.raises(ValueError, match=r"shape \(2, Nq\).*\(4, 2\)"):
        KeyIntervals(good.T, 4)
    with pytest.raises(ValueError, match="num_keys must be an int"):
        KeyIntervals(good, -1)
    with pytest.raises(ValueError, match=r"num_keys=3 .* query 3 has \[lo, hi\) = \[3, 4\)"):
        KeyIntervals(good, 3)
    with pytest.raises(ValueError, match=r"query 0 has \[lo, hi\) = \[-1, 1\)"):
        KeyIntervals(torch.tensor([[-1, 0], [1, 1]]), 4)
    with pytest.raises(ValueError, match=r"query 1 has \[lo, hi\) = \[2, 1\)"):
        KeyIntervals(torch.tensor([[0, 2], [1, 1]]), 4)
    with pytest.raises(ValueError, match=r"lo must be non-decreasing.*query 2 has lo=0 after 1"):
        KeyIntervals(torch.tensor([[0, 1, 0], [2, 2, 2]]), 4)
    with pytest.raises(ValueError, match=r"hi must be non-decreasing.*query 1 has hi=2 after 3"):
        KeyIntervals(torch.tensor([[0, 0], [3, 2]]), 4)
    ki = KeyIntervals(good, 4)
    with pytest.raises(ValueError, match="seq_len_k must be an int >= num_keys=4"):
        ki.query_bounds(3)
    mask = token_mask(32, True, None, None)
    keys = torch.arange(8, 16)
    with pytest.raises(ValueError, match="1-D int64"):
        KeyIntervals.for_shard(mask, 32, 0, 8, keys.int())
    with pytest.raises(ValueError, match=r"query rows \[30, 38\) do not fit a sequence of 32"):
        KeyIntervals.for_shard(mask, 32, 30, 8, keys)
    with pytest.raises(ValueError, match="query_start must be an int >= 0"):
        KeyIntervals.for_shard(mask, 32, -1, 8, keys)
    with pytest.raises(TypeError, match="TokenMask"):
        KeyIntervals.for_shard(None, 32, 0, 8, keys)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per query"):
        KeyIntervals.from_global(keys, keys[:3], keys)


def test_block_calls_check_that_the_intervals_fit() -> None:
    layout = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), block_size=BS)
    q = torch.randn(1, 32, 2, 16, dtype=torch.float64)
    ki = KeyIntervals(torch.zeros(2, 24, dtype=torch.int64), 24)
    with pytest.raises(ValueError, match="24 queries over 24 keys do not fit a call with Nq=32"):
        block_forward(q, q, q, layout, key_intervals=ki)
    with pytest.raises(ValueError, match="Nk=32"):
        block_forward(q, q, q, layout, key_intervals=KeyIntervals(torch.zeros(2, 32, dtype=torch.int64), 40))
    with pytest.raises(TypeError, match=r"key_intervals must be an attn_sparse\.intervals\.KeyIntervals"):
        block_forward(q, q, q, layout, key_intervals=token_mask(32, True, None, None))  # type: ignore[arg-type]
    out, lse = block_forward(q, q, q, layout)
    with pytest.raises(ValueError, match="do not fit"):
        block_backward(out, q, q, q, out, lse, layout, key_intervals=ki)


# ------------------------------------------------------------------ one call: causal folded in, rows that see nothing
def backends_and_dtypes() -> list[tuple[str, torch.dtype]]:
    cases = [("reference", torch.float64)]
    if triton_runs_here():
        cases += [("triton", torch.float32), ("triton", torch.float16)]
    return cases


def one_call_case() -> tuple[KeyIntervals, torch.Tensor, list[torch.Tensor]]:
    """(intervals, block mask, [q, k, v, dout] float64) of one call with Nq != Nk and queries that see nothing."""
    Nq, Nk, H, Hkv, D = 40, 72, 4, 2, 16  # partial last blocks on both sides
    g = torch.Generator().manual_seed(3)
    # lo climbs 2 keys a query; widths shrink no faster, so hi never decreases. Queries 0-4 and
    # 20-23 see nothing through the intervals (width 0)
    width = torch.tensor([0] * 5 + [10] * 11 + [8, 6, 4, 2] + [0] * 4 + [6] * 16)
    lo = (2 * torch.arange(Nq) - 10).clamp(0, Nk)
    ki = KeyIntervals(torch.stack([lo, (lo + width).clamp(max=Nk)]), Nk)
    block_mask = torch.rand(1, 3, 5, generator=g) < 0.7
    block_mask[0, 1, :] = False  # a query block without tiles
    q, k, v = (torch.randn(1, n, h, D, generator=g, dtype=torch.float64) for n, h in ((Nq, H), (Nk, Hkv), (Nk, Hkv)))
    return ki, block_mask, [q, k, v, torch.randn(q.shape, generator=g, dtype=torch.float64)]


def plain_attention(tensors: list[torch.Tensor], seen: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(out, lse, dq, dk, dv) of attention over the (query, key) pairs ``seen`` in ``dtype`` (plain torch)."""
    q, k, v, dout = tensors
    qr, kr, vr = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference.attention_from_weights(qr, kr, vr, seen, dtype=dtype)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype)))


@pytest.mark.parametrize(("backend", "dtype"), backends_and_dtypes())
def test_one_call_with_causal_and_queries_that_see_nothing(backend: str, dtype: torch.dtype) -> None:
    ki, block_mask, tensors = one_call_case()
    Nq, Nk = ki.num_queries, ki.num_keys
    layout = BlockLayout.from_dense(block_mask, block_size=BS)
    for causal in (False, True):
        seen = reference.block_sparse_weights(block_mask, (BS, BS), Nq, Nk)[None] & ki.dense()
        if causal:
            seen &= torch.ones(Nq, Nk, dtype=torch.bool).tril()
        want = plain_attention(tensors, seen, torch.float64)
        base = None if dtype == torch.float64 else plain_attention(tensors, seen, dtype)
        q, k, v, dout = (t.to(dtype) for t in tensors)
        out, lse = block_forward(q, k, v, layout, is_causal=causal, key_intervals=ki, backend=backend)
        grads = block_backward(dout, q, k, v, out, lse, layout, is_causal=causal, key_intervals=ki, backend=backend)
        empty = ~seen.any(-1).reshape(Nq)  # rows that see no key
        assert empty[:5].all() and empty[16:32].all()
        assert torch.all(out[:, empty] == 0) and torch.all(lse[..., empty] == float("-inf"))
        assert torch.all(grads[0][:, empty] == 0)
        for name, a, w, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want, base or (None,) * 5):
            assert not torch.isnan(a).any(), name
            assert_close_to_reference(f"{backend} {dtype} causal={causal} {name}", a, w, b)


@pytest.mark.skipif(not triton_runs_here(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
def test_kernels_read_query_and_key_bounds_in_every_backward_form() -> None:
    """KernelMask with key_docs != docs straight into the launchers: the stored-dS backward (its dq
    from dS reads docs, the dk/dv kernel key_docs) and the recompute one (its dq kernel reads docs)."""
    from attn_sparse.kernels import CSR, KernelMask, block_sparse_backward, block_sparse_forward, default_config

    ki, block_mask, tensors = one_call_case()
    Nq, Nk = ki.num_queries, ki.num_keys
    seen = reference.block_sparse_weights(block_mask, (BS, BS), Nq, Nk)[None] & ki.dense()
    want = plain_attention(tensors, seen, torch.float64)
    base = plain_attention(tensors, seen, torch.float32)
    q, k, v, dout = (t.float() for t in tensors)
    csr = CSR.from_layout(BlockLayout.from_dense(block_mask, block_size=BS))
    kmask = KernelMask(True, Nq + Nk, Nq + Nk, ki.bounds, ki.query_bounds(Nk))
    cfg = default_config((BS, BS), head_dim=16, banded=True)
    for form, c in (
        ("stored dS", replace(cfg, ds_scratch_bytes=2**20)),
        ("recompute", replace(cfg, ds_scratch_bytes=0)),
    ):
        out, lse = block_sparse_forward(q, k, v, csr, kmask, 0.25, c)
        grads = block_sparse_backward(dout, q, k, v, out, lse, csr, kmask, 0.25, c)
        for name, a, w, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want, base):
            assert_close_to_reference(f"{form} {name}", a, w, b)
    with pytest.raises(ValueError, match=r"KernelMask.key_docs must be a contiguous int32 tensor of shape \(2, 72\)"):
        block_sparse_forward(q, k, v, csr, kmask._replace(key_docs=ki.query_bounds(Nk)[:, :40]), 0.25, cfg)
    with pytest.raises(ValueError, match="key_docs needs docs"):
        block_sparse_forward(q, k, v, csr, kmask._replace(docs=None), 0.25, cfg)


# ------------------------------------------------------------------ a query shard over two interleaved key sets
def shard_by_key_sets(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    mask: TokenMask,
    dout: torch.Tensor,
    q0: int,
    backend: str,
) -> tuple[torch.Tensor, ...]:
    """(out, lse, dq, dk, dv) of rows [q0, N) through block_forward / block_backward over the keys of
    the even and of the odd 16-token blocks, each call masked by KeyIntervals.for_shard."""
    B, N, H, D = q.shape
    nb = -(-N // BS)
    qs, dos = q[:, q0:], dout[:, q0:]
    calls = []
    for parity in (0, 1):
        blocks = torch.arange(parity, nb, 2)
        keys = (blocks[:, None] * BS + torch.arange(BS)).flatten()
        keys = keys[keys < N]
        ki = KeyIntervals.for_shard(mask, N, q0, N - q0, keys)
        layout = BlockLayout.from_dense(block_mask[:, q0 // BS :][:, :, blocks], block_size=BS)
        calls.append((keys, k[:, keys], v[:, keys], layout, ki))
    ad = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, N - q0, H, D, dtype=ad)
    lse = torch.full((B, H, N - q0), float("-inf"), dtype=ad)
    for _, kk, vv, layout, ki in calls:
        o, l = block_forward(qs, kk, vv, layout, key_intervals=ki, backend=backend)
        merge_into_(out, lse, o, l)
    dq = torch.zeros_like(out)
    dk = torch.zeros(k.shape, dtype=ad)
    dv = torch.zeros_like(dk)
    for keys, kk, vv, layout, ki in calls:
        gq, gk, gv = block_backward(dos, qs, kk, vv, out, lse, layout, key_intervals=ki, backend=backend)
        dq += gq
        dk[:, keys] += gk
        dv[:, keys] += gv
    return out, lse, dq, dk, dv


RANGED = [
    # (N, q0, H, Hkv, layout heads, causal, window, documents)
    (88, 32, 4, 2, 1, True, (20, -1), None),  # causal + window wider than a tile
    (96, 32, 2, 1, 2, False, (5, 7), [0, 1, 2, 30, 31, 60, 96]),  # window + documents, 1-token documents
    (88, 48, 2, 2, 1, True, (3, -1), [0, 17, 18, 50, 88]),  # causal + small window + documents
]


def run_ranged(
    N: int, q0: int, H: int, Hkv: int, heads: int, causal: bool, window, docs, dtype: torch.dtype, backend: str
) -> None:
    D = 16
    g = torch.Generator().manual_seed(N + q0 + heads)
    q, k, v = (torch.randn(1, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dout[:, :q0] = 0  # the full attention's gradients then come from the shard's rows only
    nb = -(-N // BS)
    block_mask = torch.rand(heads, nb, nb, generator=g) < 0.6
    block_mask[:, nb - 2] = False  # a query block that sees no key: out 0, lse -inf, zero gradients
    mask = token_mask(N, causal, window, docs)
    cu = mask.cu_seqlens

    def full(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        qr, kr, vr = (t.to(dt).requires_grad_() for t in (q, k, v))
        out, lse = reference.block_sparse_attention(
            qr, kr, vr, block_mask, (BS, BS), is_causal=causal, window_size=window, cu_seqlens=cu, dtype=dt
        )
        grads = torch.autograd.grad(out, (qr, kr, vr), dout.to(dt))
        return out.detach()[:, q0:], lse.detach()[..., q0:], grads[0][:, q0:], grads[1], grads[2]

    want = full(torch.float64)
    base = None if dtype == torch.float64 else full(dtype)
    low = [t.to(dtype) for t in (q, k, v)]
    got = shard_by_key_sets(*low, block_mask, mask, dout.to(dtype), q0, backend)
    empty = slice((nb - 2) * BS - q0, (nb - 1) * BS - q0)
    assert torch.all(got[0][:, empty] == 0) and torch.all(got[1][..., empty] == float("-inf"))
    assert torch.all(got[2][:, empty] == 0)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        assert_close_to_reference(f"{backend} {dtype} {name}", got[i], want[i], None if base is None else base[i])


@pytest.mark.parametrize(("N", "q0", "H", "Hkv", "heads", "causal", "window", "docs"), RANGED)
def test_key_sets_reference_backend_float64(N, q0, H, Hkv, heads, causal, window, docs) -> None:
    run_ranged(N, q0, H, Hkv, heads, causal, window, docs, torch.float64, "reference")


@pytest.mark.skipif(not triton_runs_here(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("N", "q0", "H", "Hkv", "heads", "causal", "window", "docs"), RANGED[1:])
def test_key_sets_triton_backend_interpreted(N, q0, H, Hkv, heads, causal, window, docs, dtype) -> None:
    run_ranged(N, q0, H, Hkv, heads, causal, window, docs, dtype, "triton")
