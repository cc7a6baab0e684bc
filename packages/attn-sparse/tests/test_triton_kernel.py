"""The Triton block-sparse kernels against the float64 reference, in Triton's CPU interpreter.

Outputs and dq/dk/dv on fresh random inputs: causal and not, GQA, shared and per-head layouts,
partial last blocks, Nq != Nk, tiles smaller than the layout blocks, empty rows (0 output, zero
gradients, no NaN). Low-precision results must be within 2x the error of plain PyTorch in the
same dtype (attn_core.testing). Shapes are tiny: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import os

# Kernels are decorated at import: the interpreter must be selected before attn_sparse.kernels loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools
import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from attn_core.reference import block_sparse_attention as reference_attention
from attn_core.testing import assert_close_to_reference
from attn_sparse.kernels import (
    CSR,
    KernelConfig,
    KernelMask,
    block_sparse_attention_csr,
    default_config,
    interpret_mode,
    launch,
    launch_order,
    ops,
    planning,
    row_table,
    stored_ds_chunks,
)
from attn_sparse.masks import TokenMask


def csr_from_mask(mask: torch.Tensor, block_size: tuple[int, int]) -> CSR:
    """CSR and transposed CSR (int32) of a (Hl, nqb, nkb) bool block mask; written independently of BlockLayout."""
    hl, nqb, nkb = mask.shape
    crow = torch.zeros(hl * nqb + 1, dtype=torch.int64)
    crow[1:] = mask.reshape(hl * nqb, nkb).sum(-1).cumsum(0)
    col = mask.reshape(hl * nqb, nkb).nonzero()[:, 1]
    mt = mask.transpose(1, 2).reshape(hl * nkb, nqb)
    ccol = torch.zeros(hl * nkb + 1, dtype=torch.int64)
    ccol[1:] = mt.sum(-1).cumsum(0)
    row = mt.nonzero()[:, 1]
    i32 = torch.int32
    return CSR(crow.to(i32), col.to(i32), ccol.to(i32), row.to(i32), hl, nqb, nkb, block_size)


def run_case(
    *,
    B: int,
    Nq: int,
    Nk: int,
    H: int,
    Hkv: int,
    D: int,
    block_size: tuple[int, int],
    mask: torch.Tensor,
    is_causal: bool,
    dtype: torch.dtype,
    config: KernelConfig | None = None,
    seed: int = 0,
    window_size: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check out, dq, dk, dv against the float64 reference; return them for extra assertions.

    Token masks: is_causal, window_size, cu_seqlens (B == 1), through a KernelMask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Nk, Hkv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Nk, Hkv, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(B, Nq, H, D, generator=g).to(dtype)
    scale = 1.0 / math.sqrt(D)
    csr = csr_from_mask(mask, block_size)
    tokens = TokenMask.build(
        is_causal=is_causal, window_size=window_size, cu_seqlens=cu_seqlens, batch=B, seq_len_q=Nq, seq_len_k=Nk,
        device=q.device,
    )  # fmt: skip
    kmask = KernelMask(tokens.banded, *tokens.kernel_sides(Nq, Nk), tokens.document_bounds(Nq))

    # every backward: stored dS in one chunk, stored dS one unit per chunk, and recompute
    cfg = config if config is not None else default_config(block_size)
    units = B if mask.shape[0] > 1 else B * Hkv
    unit_bytes = (
        int(mask.sum()) * block_size[0] * block_size[1] * q.element_size() * (1 if mask.shape[0] > 1 else H // Hkv)
    )
    variants = {"stored dS": cfg, "recompute": replace(cfg, ds_scratch_bytes=0)}
    if units > 1:
        variants["stored dS, chunked"] = replace(cfg, ds_scratch_bytes=unit_bytes)
    slot_bytes = block_size[0] * block_size[1] * q.element_size()
    widest_column = int(mask.sum(1).max()) * (H // Hkv) * slot_bytes
    if mask.shape[0] == 1 and 0 < widest_column < unit_bytes:  # a unit in ranges of key blocks
        variants["stored dS, key-block ranges"] = replace(cfg, ds_scratch_bytes=max(widest_column, unit_bytes // 2))
    # chunking is a speed choice that tiny layouts fail (their chunks are shorter than their
    # longest column); here every chunked variant must run chunked, so count the GPU as huge
    with mock.patch.object(planning, "DKV_PROGRAMS_PER_SM", 1e-9):
        for name, c in variants.items():
            chunks = stored_ds_chunks(csr, B, Hkv, H // Hkv, q.element_size(), c)
            if name == "recompute" or unit_bytes == 0:
                assert chunks == [], name
            elif "ranges" in name:
                assert len(chunks) >= 2 * units and all(ch.u1 - ch.u0 == 1 for ch in chunks), (name, chunks)
            else:
                assert len(chunks) == (units if "chunked" in name else 1), (name, chunks)

        out = block_sparse_attention_csr(q, k, v, csr, mask=kmask, softmax_scale=scale, config=cfg)
        assert out.shape == q.shape and out.dtype == dtype
        grads = {}
        for name, c in variants.items():
            o = block_sparse_attention_csr(q, k, v, csr, mask=kmask, softmax_scale=scale, config=c)
            grads[name] = torch.autograd.grad(o, (q, k, v), dout)
    dq, dk, dv = grads["stored dS"]

    def reference(ct: torch.dtype) -> tuple[torch.Tensor, ...]:
        qr, kr, vr = (t.detach().to(ct).requires_grad_() for t in (q, k, v))
        o, _ = reference_attention(
            qr, kr, vr, mask, block_size, is_causal=is_causal, window_size=window_size, cu_seqlens=cu_seqlens,
            softmax_scale=scale, dtype=ct,
        )  # fmt: skip
        grads = torch.autograd.grad(o, (qr, kr, vr), dout.to(ct))
        return (o.detach(), *grads)

    ref = reference(torch.float64)
    base = reference(dtype)
    assert_close_to_reference("out", out, ref[0], base[0])
    for path, g in grads.items():
        for name, got, r, b in zip(("dq", "dk", "dv"), g, ref[1:], base[1:]):
            assert_close_to_reference(f"{name} ({path})", got, r, b)
    return out.detach(), dq, dk, dv


def random_mask(hl: int, nqb: int, nkb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(hl, nqb, nkb, generator=g) < density


def test_interpreter_selected() -> None:
    assert interpret_mode(), "these tests need TRITON_INTERPRET=1 (set before triton kernels are imported)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_noncausal_shared_gqa_partial_blocks(dtype: torch.dtype) -> None:
    # N=80 with 32-blocks: the last block row/column holds 16 tokens; H=4 reads Hkv=2 (GQA)
    mask = random_mask(1, 3, 3, 0.6, seed=1)
    mask[0, 2, 2] = True  # the partial tile is active
    run_case(B=2, Nq=80, Nk=80, H=4, Hkv=2, D=16, block_size=(32, 32), mask=mask, is_causal=False, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_causal_per_head_uneven_groups(dtype: torch.dtype) -> None:
    # H=3 query heads over one kv head, each head with its own layout; Bq != Bk; partial blocks
    H = 3
    mask = random_mask(H, 3, 5, 0.7, seed=2) | torch.eye(3, 5, dtype=torch.bool).repeat_interleave(1, 0)
    run_case(B=1, Nq=70, Nk=70, H=H, Hkv=1, D=32, block_size=(32, 16), mask=mask, is_causal=True, dtype=dtype, seed=3)


@pytest.mark.parametrize("subtiles", [False, True])
def test_noncausal_aligned_lengths_empty_row(subtiles: bool) -> None:
    # N a multiple of the key block and no causal mask: every tile is full, so the kernels skip the
    # masked-tile count; row block 1 is empty; with subtiles, 16-wide tiles walk the 32-blocks (the
    # forward reads each next block index one iteration ahead, also across sub-tiles)
    mask = random_mask(4, 3, 3, 0.6, seed=21)
    mask[:, 1, :] = False
    mask[:, 0, 0] = True
    mask[:, 2, 1] = True
    cfg = (
        KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16) if subtiles else None
    )
    out, *_ = run_case(
        B=2, Nq=96, Nk=96, H=4, Hkv=2, D=16, block_size=(32, 32), mask=mask, is_causal=False,
        dtype=torch.float16, config=cfg, seed=22,
    )  # fmt: skip
    assert (out[:, 32:64] == 0).all()


def test_subtiles_smaller_than_layout_blocks() -> None:
    # 32x32 layout blocks walked with 16-wide tiles: exercises the sub-tile index arithmetic of all kernels
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16)
    mask = random_mask(2, 3, 3, 0.6, seed=4)
    mask[:, torch.arange(3), torch.arange(3)] = True
    run_case(
        B=1, Nq=90, Nk=90, H=2, Hkv=2, D=16, block_size=(32, 32), mask=mask, is_causal=True,
        dtype=torch.float32, config=cfg, seed=5,
    )  # fmt: skip


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_pointer_and_descriptor_loads(is_causal: bool, tma: bool) -> None:
    # streamed tiles through (interpreted) TMA descriptors, where rows past N read as zeros, or
    # through masked pointer loads (GPUs without TMA, unaligned tensors)
    mask = random_mask(2, 3, 3, 0.7, seed=13)
    mask[:, torch.arange(3), torch.arange(3)] = True
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16, tma=tma)
    run_case(
        B=2, Nq=90, Nk=90, H=2, Hkv=1, D=16, block_size=(32, 32), mask=mask, is_causal=is_causal,
        dtype=torch.float16, config=cfg, seed=14,
    )  # fmt: skip


def test_unaligned_views_fall_back_to_pointer_loads() -> None:
    # q/k/v/dout sliced out of packed buffers at an odd element offset: TMA needs 16-byte aligned
    # bases, so the kernels must take the pointer path and still be exact
    B, N, H, D = 1, 70, 2, 16
    g = torch.Generator().manual_seed(21)
    packed = torch.randn(B, N, 4 * H * D + 1, generator=g).to(torch.float16)
    q, k, v, dout = (packed[..., 1 + i * H * D : 1 + (i + 1) * H * D].unflatten(-1, (H, D)) for i in range(4))
    assert not launch._has_tma(q, k, v) and launch._has_tma(q.contiguous())
    mask = random_mask(1, 3, 3, 0.8, seed=22)
    mask[:, torch.arange(3), torch.arange(3)] = True
    csr = csr_from_mask(mask, (32, 32))
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16, tma=True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention_csr(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), csr, config=cfg)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_c = block_sparse_attention_csr(qg, kg, vg, csr, config=cfg)  # aligned copies: descriptor path
    grads_c = torch.autograd.grad(out_c, (qg, kg, vg), dout.contiguous())
    for a, b in zip((out, *grads), (out_c, *grads_c)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    ref, _ = reference_attention(
        q.detach().double(), k.detach().double(), v.detach().double(), mask, (32, 32), dtype=torch.float64
    )
    assert (out.double() - ref).abs().max().item() < 2e-2


def test_unaligned_queries_with_aligned_keys() -> None:
    # descriptors are chosen per tensor group: an unaligned q next to aligned k/v must give the
    # result of an aligned q exactly (K/V stay on descriptors in the forward)
    B, N, H, Hkv, D = 2, 70, 2, 1, 16
    g = torch.Generator().manual_seed(25)
    packed = torch.randn(B, N, H * D + 1, generator=g).to(torch.float16)
    q = packed[..., 1:].unflatten(-1, (H, D))
    k, v = (torch.randn(B, N, Hkv, D, generator=g).to(torch.float16) for _ in range(2))
    assert not launch._has_tma(q) and launch._has_tma(k, v)
    mask = random_mask(1, 3, 3, 0.8, seed=26)
    mask[:, torch.arange(3), torch.arange(3)] = True
    csr = csr_from_mask(mask, (32, 32))
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16, tma=True)
    for causal in (False, True):
        out = block_sparse_attention_csr(
            q, k, v, csr, mask=KernelMask.causal(causal, q.shape[1], k.shape[1]), config=cfg
        )
        out_c = block_sparse_attention_csr(
            q.contiguous(), k, v, csr, mask=KernelMask.causal(causal, q.shape[1], k.shape[1]), config=cfg
        )
        assert torch.equal(out, out_c)
        ref, _ = reference_attention(
            q.double(), k.double(), v.double(), mask, (32, 32), is_causal=causal, dtype=torch.float64
        )
        assert (out.double() - ref).abs().max().item() < 2e-2


def test_cross_attention_lengths_and_dense_layout() -> None:
    # Nq != Nk, every tile active (density 1.0), causal top-left aligned
    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    run_case(B=1, Nq=40, Nk=48, H=2, Hkv=1, D=16, block_size=(32, 16), mask=mask, is_causal=True, dtype=torch.float16)


def test_empty_rows_give_zero_output_and_gradients() -> None:
    # row block 1 has no tile; under causal, row block 0's only tile lies above the diagonal
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0, 2] = True
    mask[0, 2, :] = True
    out, dq, _, _ = run_case(
        B=1, Nq=48, Nk=48, H=2, Hkv=1, D=16, block_size=(16, 16), mask=mask, is_causal=True, dtype=torch.float32
    )
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[:, :32] == 0).all() and (dq[:, :32] == 0).all()
    assert out[:, 32:].abs().sum() > 0


def test_single_token_and_fully_empty_layout() -> None:
    one = torch.ones(1, 1, 1, dtype=torch.bool)
    run_case(B=1, Nq=1, Nk=1, H=1, Hkv=1, D=16, block_size=(16, 16), mask=one, is_causal=True, dtype=torch.float16)
    none = torch.zeros(1, 2, 2, dtype=torch.bool)
    out, dq, dk, dv = run_case(
        B=1, Nq=20, Nk=20, H=1, Hkv=1, D=16, block_size=(16, 16), mask=none, is_causal=False, dtype=torch.float32
    )
    for t in (out, dq, dk, dv):
        assert (t == 0).all()


def test_default_config_fits_small_blocks_and_bad_config_raises() -> None:
    assert not default_config((16, 16)).check((16, 16))
    assert not default_config((128, 64)).check((128, 64))
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    csr = csr_from_mask(mask, (16, 16))
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match="fwd_m=32"):
        block_sparse_attention_csr(
            q,
            q,
            q,
            csr,
            config=KernelConfig(fwd_m=32, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16),
        )


@pytest.mark.parametrize("scratch", ["default", "key-block ranges"])
def test_torch_compile_traces_the_custom_ops_without_graph_breaks(
    monkeypatch: pytest.MonkeyPatch, scratch: str
) -> None:
    mask = random_mask(1, 2, 2, 0.7, seed=9)
    mask[0, :, 0] = True  # key block 0: 2 tiles, so 2 slots hold any one key block
    csr = csr_from_mask(mask, (16, 16))
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g).requires_grad_() for _ in range(3))
    cfg = default_config((16, 16))
    if scratch != "default":  # the backward op runs each kv head in ranges of key blocks
        monkeypatch.setattr(planning, "DKV_PROGRAMS_PER_SM", 1e-9)
        cfg = replace(cfg, ds_scratch_bytes=2 * 16 * 16 * q.element_size())
        chunks = stored_ds_chunks(csr, 1, 2, 1, q.element_size(), cfg)
        assert len(chunks) == 4 and all(c.c1 - c.c0 == 1 for c in chunks), chunks

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention_csr(
            q, k, v, csr, mask=KernelMask.causal(True, q.shape[1], k.shape[1]), config=cfg
        ).sum(dim=-1)

    graphs: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)  # fullgraph: a graph break raises
    got = compiled(q, k, v)
    assert len(graphs) == 1 and "attn_sparse.block_sparse_fwd" in graphs[0]
    want = fn(q, k, v)
    assert torch.equal(got, want)
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh layout", "layout used eagerly first"])
def test_public_api_and_module_compile_whole(warm: bool) -> None:
    # attn_sparse.block_sparse_attention and BlockSparseAttention under torch.compile: backend
    # choice, validation and the layout's caches trace (a fresh layout's transposed slots are
    # built inside the graph; a used one's are read from its cache), the kernels run as custom ops
    from attn_sparse import BlockSparseAttention, block_sparse_attention, patterns

    torch._dynamo.reset()
    layout = patterns.local_window(80, 24, block_size=(16, 16))
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 80, 4, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 80, 2, 16, generator=g).requires_grad_() for _ in range(2))
    module = BlockSparseAttention(layout, backend="triton")
    if warm:
        block_sparse_attention(q, k, v, layout, backend="triton", is_causal=True).sum().backward()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q, k, v, layout, backend="triton", is_causal=True) + module(q, k, v)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got = compiled(q, k, v)
    want = fn(q, k, v)
    assert torch.equal(got, want)
    dout = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eager_first", [False, True], ids=["compiled only", "eager step first"])
def test_compiled_steps_reuse_launch_tables(monkeypatch: pytest.MonkeyPatch, eager_first: bool) -> None:
    # a compiled forward + backward builds its launch tables in the first call only (the compiled
    # backward's CSR tensors are new objects every call: the memo keys on storage), and none at
    # all after an eager step: eager calls (through the layout) and the ops (from the raw CSR
    # tensors) share one memo
    from attn_sparse import BlockSparseAttention, patterns

    builds: list[int] = []
    real = planning.row_table
    monkeypatch.setattr(planning, "row_table", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    torch._dynamo.reset()
    module = BlockSparseAttention(patterns.local_window(64, 16, block_size=(16, 16)), backend="triton")
    g = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 64, 2, 16, generator=g)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = module(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    want = step(q, k, v) if eager_first else None
    before = len(builds)
    compiled = torch.compile(step, backend="aot_eager")
    first = compiled(q, k, v)
    assert (len(builds) == before) if eager_first else (len(builds) > 0)
    after_first = len(builds)
    for got in (first, compiled(q, k, v), compiled(q, k, v)):
        for a, b in zip(got, want or first):
            assert torch.equal(a, b)
    assert len(builds) == after_first


def test_double_backward_raises_a_clear_error() -> None:
    mask = random_mask(1, 2, 2, 0.8, seed=41)
    mask[0, :, 0] = True
    csr = csr_from_mask(mask, (16, 16))
    g = torch.Generator().manual_seed(42)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g).requires_grad_() for _ in range(3))
    dq, dk = torch.autograd.grad(block_sparse_attention_csr(q, k, v, csr).square().sum(), (q, k), create_graph=True)
    # first order is unchanged by create_graph
    dq1, dk1 = torch.autograd.grad(block_sparse_attention_csr(q, k, v, csr).square().sum(), (q, k))
    assert torch.equal(dq.detach(), dq1) and torch.equal(dk.detach(), dk1)
    with pytest.raises(
        RuntimeError, match=r"double backward .*not supported by the triton backend.*backend='reference'"
    ):
        (dq.square().sum() + dk.sum()).backward()


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_custom_ops_are_kept_out_of_cuda_graphs() -> None:
    # the ops memoise tensors across calls (below), which a CUDA graph pool must not hold:
    # mode="reduce-overhead" must run them between graphs (tests/test_cuda_graphs.py runs it on a GPU)
    for op in (torch.ops.attn_sparse.block_sparse_fwd, torch.ops.attn_sparse.block_sparse_bwd):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


def test_custom_ops_memoise_launch_tables_per_layout_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # the ops (the torch.compile path) get raw CSR tensors: their launch tables are memoised while
    # those storages are alive and unmodified, whatever tensor objects view them (the compiled
    # backward gets new ones each call), never for other storages holding the same values
    builds: list[int] = []
    real = planning.row_table
    monkeypatch.setattr(planning, "row_table", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    mask = random_mask(1, 3, 3, 0.7, seed=23)
    mask[0, :, 0] = True
    g = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g) for _ in range(3))
    cfg = default_config((16, 16))

    def run(csr: CSR) -> torch.Tensor:
        out, _ = torch.ops.attn_sparse.block_sparse_fwd(
            q, k, v, *ops.BLOCK_SPARSE.encode(csr, KernelMask.causal(False, q.shape[1], k.shape[1]), 0.25, cfg)
        )
        return out

    csr = csr_from_mask(mask, (16, 16))
    first = run(csr)
    assert len(builds) == 1
    assert torch.equal(run(csr), first) and len(builds) == 1  # same tensors: memoised
    aliases = CSR(*(t.detach() for t in (csr.crow, csr.col, csr.ccol, csr.row)), 1, 3, 3, (16, 16))
    assert torch.equal(run(aliases), first) and len(builds) == 1  # new tensor objects, same storage
    del aliases
    other = csr_from_mask(mask, (16, 16))  # equal values, other tensors
    assert torch.equal(run(other), first) and len(builds) == 2
    csr.col.add_(0)  # an in-place write bumps the version counter: built again
    run(csr)
    assert len(builds) == 3
    shifted = CSR(csr.crow, csr.col[1:], csr.ccol, csr.row, 1, 3, 3, (16, 16))  # another view: its own entry
    keys = len(planning.LAUNCH_MEMO)
    planning.LAUNCH_MEMO.memo_for((shifted.crow, shifted.col, shifted.ccol, shifted.row), (1, 3, 3, 16, 16))
    assert len(planning.LAUNCH_MEMO) == min(keys + 1, planning.LAUNCH_MEMO_LAYOUTS)


def test_strided_inputs_match_contiguous() -> None:
    # q/k/v as (B, H, N, D) storage viewed as (B, N, H, D): kernels read through the strides
    mask = random_mask(1, 2, 2, 0.8, seed=12)
    mask[0, 1, 1] = True
    csr = csr_from_mask(mask, (16, 16))
    g = torch.Generator().manual_seed(13)
    qs, ks, vs = (torch.randn(1, 2, 32, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not qs.is_contiguous()
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (qs, ks, vs))
    out_s = block_sparse_attention_csr(qs, ks, vs, csr, mask=KernelMask.causal(True, qs.shape[1], ks.shape[1]))
    out_c = block_sparse_attention_csr(qc, kc, vc, csr, mask=KernelMask.causal(True, qc.shape[1], kc.shape[1]))
    assert torch.equal(out_s, out_c)
    do = torch.randn(out_s.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out_s, (qs, ks, vs), do), torch.autograd.grad(out_c, (qc, kc, vc), do)):
        assert torch.equal(a, b)


def test_causal_wide_key_blocks_and_grouped_heads() -> None:
    # Bk > Bq: a key block spans two query blocks, so the causal split points differ per row;
    # H=6 over Hkv=2 (GROUP=3), per-head layouts, N not a multiple of either block size
    H = 6
    mask = random_mask(H, 5, 3, 0.6, seed=14)
    mask[:, torch.arange(5), torch.arange(5) // 2] = True
    run_case(
        B=1, Nq=75, Nk=75, H=H, Hkv=2, D=16, block_size=(16, 32), mask=mask, is_causal=True,
        dtype=torch.float32, seed=15,
    )  # fmt: skip


def test_launch_order_heavy_buckets_first_then_head_by_head() -> None:
    # per-head layout, 2 heads x 4 blocks with tile counts [[1, 5, 2, 3], [4, 0, 1, 9]], batch 2;
    # power-of-two buckets: [[0, 2, 1, 1], [2, -1, 0, 3]]
    counts = torch.tensor([1, 5, 2, 3, 4, 0, 1, 9])
    order = launch_order(counts.view(2, 4), batch=2, heads=2)
    assert order.dtype == torch.int32 and order.shape == (16,)
    # entries are bh * 4 + block with bh = b * 2 + h: bucket 3, then 2, 1, 0, empty blocks last
    assert order.tolist() == [7, 15, 1, 4, 9, 12, 2, 3, 10, 11, 0, 6, 8, 14, 5, 13]
    # a shared layout (one row of counts) applies to every head; GQA sums a kv head's query heads
    shared = launch_order(counts[:4].view(1, 4), batch=1, heads=2)
    assert shared.tolist() == [1, 5, 2, 3, 6, 7, 0, 4]
    grouped = launch_order(counts.view(2, 4), batch=1, heads=1, group=2)  # sums [5, 5, 3, 12]: buckets [2, 2, 1, 3]
    assert grouped.tolist() == [3, 0, 1, 2]


def test_row_table_gathers_each_launched_rows_bounds() -> None:
    # the same per-head counts as above: each table row is (launch-order entry, its layout row's
    # CSR bounds); per-head layouts index the row by head, shared ones by block only
    counts = torch.tensor([1, 5, 2, 3, 4, 0, 1, 9])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    table = row_table(offsets[:-1], offsets[1:], 2, batch=2, heads=2)
    assert table.dtype == torch.int32 and table.shape == (16, 3)
    assert table[:, 0].tolist() == launch_order(counts.view(2, 4), batch=2, heads=2).tolist()
    for entry, start, end in table.tolist():
        lrow = (entry // 4 % 2) * 4 + entry % 4
        assert (start, end) == (offsets[lrow].item(), offsets[lrow + 1].item())
    shared = row_table(offsets[:4], offsets[1:5], 1, batch=1, heads=2)
    for entry, start, end in shared.tolist():
        assert (start, end) == (offsets[entry % 4].item(), offsets[entry % 4 + 1].item())


@pytest.mark.parametrize("is_causal", [False, True])
def test_stored_ds_reads_only_written_scratch(monkeypatch: pytest.MonkeyPatch, is_causal: bool) -> None:
    # The dk/dv kernel skips key tiles past N and query blocks wholly above the diagonal, so parts
    # of the scratch are never written; a NaN-filled scratch shows the dq kernel never reads them.
    # Bk > Bq (a key block spans two query blocks), N a multiple of neither block size, GQA.
    monkeypatch.setattr(
        launch, "_scratch", lambda n, like: torch.full((n,), float("nan"), dtype=like.dtype, device=like.device)
    )
    mask = random_mask(1, 5, 3, 0.6, seed=31)
    mask[:, torch.arange(5), torch.arange(5) // 2] = True
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16)
    run_case(
        B=2, Nq=75, Nk=75, H=4, Hkv=2, D=16, block_size=(16, 32), mask=mask, is_causal=is_causal,
        dtype=torch.float32, config=cfg, seed=32,
    )  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
def test_token_masks_every_backward_reads_only_written_scratch(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    # Windows and documents make the band's edges masked on both sides and skip whole tiles: every
    # backward form (stored dS in one chunk, per unit, in key-block ranges; recompute) must agree
    # with the float64 reference, and a NaN-filled scratch shows skipped tiles are never read.
    monkeypatch.setattr(
        launch, "_scratch", lambda n, like: torch.full((n,), float("nan"), dtype=like.dtype, device=like.device)
    )
    mask = random_mask(1, 5, 3, 0.8, seed=41)
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16)
    cu = torch.tensor([0, 1, 20, 20, 52, 75], dtype=torch.int32)  # a 1-token and an empty document
    run_case(
        B=1, Nq=75, Nk=75, H=4, Hkv=2, D=16, block_size=(16, 32), mask=mask, is_causal=causal,
        dtype=torch.float32, config=cfg, seed=42, window_size=(9, -1 if causal else 5), cu_seqlens=cu,
    )  # fmt: skip


def test_masked_calls_default_to_the_recompute_backward() -> None:
    # measured faster with token masks (docs/benchmarks/sparse_tune_masks_h100.md); unmasked keep stored dS
    banded128 = default_config((128, 128), head_dim=128, banded=True)
    assert banded128.ds_scratch_bytes == 0
    assert (banded128.dkv_m, banded128.dkv_n, banded128.dkv_warps, banded128.dkv_stages) == (64, 64, 4, 2)
    banded64 = default_config((128, 128), head_dim=64, banded=True)
    assert banded128.fwd_warps == 8 and banded64.fwd_warps == 4
    assert (banded64.dkv_m, banded64.dkv_n, banded64.dkv_warps, banded64.dkv_stages) == (32, 128, 4, 3)
    assert default_config((128, 128), head_dim=64).fwd_warps == 8  # unmasked layouts: not retuned
    assert default_config((128, 128), head_dim=128).ds_scratch_bytes > 0
    assert default_config((64, 64), head_dim=128, banded=True).dkv_n == 64  # clipped to the block


def unit_chunks(bounds: list[int], num_kb: int, nnz: int) -> list[tuple[int, ...]]:
    """Whole-unit chunks with these unit bounds (every key block, every position)."""
    return [(u0, u1, 0, num_kb, 0, nnz) for u0, u1 in itertools.pairwise(bounds)]


def test_stored_ds_chunks_budget_and_long_columns() -> None:
    # 8x8 blocks of 16, one kv head per unit, one unit of scratch per chunk: 4 chunks of 1 unit
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16)
    diag = torch.eye(8, dtype=torch.bool)[None]
    slot = 16 * 16 * 2
    unit = 8 * slot
    csr = csr_from_mask(diag, (16, 16))
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=unit)) == unit_chunks([0, 1, 2, 3, 4], 8, 8)
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=4 * unit)) == unit_chunks([0, 4], 8, 8)
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=slot - 1)) == []  # no tile fits
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=0)) == []
    # less than a unit: each unit in ranges of key blocks, balanced by tiles (3 ranges of <= 3 tiles: 2, 3, 3)
    ranges = [(0, 2, 0, 2), (2, 5, 2, 5), (5, 8, 5, 8)]
    got = stored_ds_chunks(csr, 1, 2, 1, 2, replace(cfg, ds_scratch_bytes=3 * slot))
    assert got == [(u, u + 1, *r) for u in range(2) for r in ranges]
    # a key block every query block attends: 8 tiles in one program, more than a 1-unit chunk's
    # 15 tiles over 2 programs, so chunking would wait on it: recompute; in one chunk it is fine
    glob = diag.clone()
    glob[0, :, 0] = True
    csr = csr_from_mask(glob, (16, 16))
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=15 * slot)) == []
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=4 * 15 * slot)) == unit_chunks([0, 4], 8, 15)
    # a per-head layout's unit is a whole batch (bounds in (batch, kv head) units); one that does
    # not fit recomputes
    csr = csr_from_mask(diag.expand(2, 8, 8).clone(), (16, 16))
    assert stored_ds_chunks(csr, 3, 2, 1, 2, replace(cfg, ds_scratch_bytes=2 * unit)) == unit_chunks(
        [0, 2, 4, 6], 8, 16
    )
    assert stored_ds_chunks(csr, 3, 2, 1, 2, replace(cfg, ds_scratch_bytes=2 * unit - 1)) == []


def test_stored_ds_needs_int32_descriptor_rows() -> None:
    # transposed-CSR position * Bk indexes the scratch in int32: a layout with 2**31 / Bk tiles or
    # more (1M tokens dense at 128x128 is 2**26 tiles) recomputes, whatever the budget
    nnz = 2**31 // 128
    idx = torch.zeros(nnz, dtype=torch.int32)
    offsets = torch.tensor([0, nnz], dtype=torch.int32)
    csr = CSR(offsets, idx, offsets, idx, 1, 1, 1, (128, 128))
    cfg = replace(default_config((128, 128)), ds_scratch_bytes=2**62)
    assert stored_ds_chunks(csr, 1, 1, 1, 2, cfg) == []
    small = CSR(offsets, idx, offsets, idx, 1, 1, 1, (64, 64))  # 64-key blocks: positions * 64 fit
    assert stored_ds_chunks(small, 1, 1, 1, 2, cfg) == [(0, 1, 0, 1, 0, nnz)]


def test_column_ranges_fewest_then_balanced() -> None:
    # shared layout, 6 key blocks holding [4, 1, 1, 1, 1, 4] tiles (12 in all)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, :, 0] = mask[0, :, 5] = True
    mask[0, torch.arange(4), torch.arange(1, 5)] = True
    csr = csr_from_mask(mask, (16, 16))
    assert csr.column_ranges(12) == [(0, 6, 0, 12)]
    assert csr.column_ranges(6) == [(0, 3, 0, 6), (3, 6, 6, 12)]  # the even cut at 6 tiles fits
    # at most 5: greedy needs 3 ranges ([4, 1], [1, 1, 1], [4]); the even cuts (at 4 and 8 tiles) fit
    assert csr.column_ranges(5) == [(0, 1, 0, 4), (1, 5, 4, 8), (5, 6, 8, 12)]
    assert csr.column_ranges(3) == []  # one key block alone holds 4


def test_key_block_range_tables_cover_only_that_range() -> None:
    # the dq-from-dS table of a key-block range bounds each row to its blocks in the range, and
    # the dk/dv order launches exactly the range's columns (entries count the whole layout)
    mask = random_mask(1, 5, 7, 0.5, seed=41)
    csr = csr_from_mask(mask, (16, 16))
    col = csr.col.tolist()
    for c0, c1 in [(0, 7), (2, 5), (6, 7)]:
        table = csr.row_table(1, 3, (c0, c1))
        assert table.shape == (15, 3)
        for entry, start, end in table.tolist():
            r = entry % 5
            assert col[start:end] == [c for c in range(c0, c1) if mask[0, r, c]]
        order = csr.column_order(2, 1, 1, (c0, c1)).tolist()
        assert sorted(order) == [u * 7 + c for u in range(2) for c in range(c0, c1)]
    full = csr.row_table(1, 3)
    assert full.tolist() == row_table(csr.crow[:-1], csr.crow[1:], 1, 1, 3).tolist()


def test_stored_ds_scratch_capped_by_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the scratch budget is min(ds_scratch_bytes, total memory / DS_SCRATCH_MEMORY_SHARE)."""
    cfg = KernelConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkv_m=16, dkv_n=16, dqs_m=16, dqs_n=16)
    unit = 8 * 16 * 16 * 2
    csr = csr_from_mask(torch.eye(8, dtype=torch.bool)[None], (16, 16))
    assert planning._scratch_cap(torch.device("cpu")) >= 2**62
    monkeypatch.setattr(planning, "_scratch_cap", lambda device: 2 * unit)
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=4 * unit)) == unit_chunks([0, 2, 4], 8, 8)
    monkeypatch.setattr(planning, "_scratch_cap", lambda device: unit // 8 - 1)
    assert stored_ds_chunks(csr, 1, 4, 1, 2, replace(cfg, ds_scratch_bytes=4 * unit)) == []
    if torch.cuda.is_available():  # the real cap: total memory over the share
        monkeypatch.undo()
        total = torch.cuda.get_device_properties(0).total_memory
        assert planning._scratch_cap(torch.device("cuda", 0)) == total // planning.DS_SCRATCH_MEMORY_SHARE
