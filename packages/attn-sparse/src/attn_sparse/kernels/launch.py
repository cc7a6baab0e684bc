"""Launchers of the block-sparse Triton kernels: :func:`block_sparse_forward`, :func:`block_sparse_backward`.

Programs take layout rows (columns) in :func:`.planning.launch_order`: heaviest power-of-two work
bucket first, head by head inside a bucket, so BigBird-like global rows start early instead of
forming a tail while a head's programs share its tiles in L2. On sm90+ GPUs the streamed tiles
(K/V, or Q/dO in the dk/dv kernel) come through TMA tensor descriptors (KernelConfig.tma).

Shapes: q (B, Nq, H, D); k, v (B, Nk, Hkv, D); out like q; lse (B, H, Nq) fp32, natural log,
``-inf`` for rows that see no key (whose output is 0). Token masks (:class:`.planning.KernelMask`):
the forward, dq and dq-from-dS kernels read the per-row bounds at query rows (``docs``), the dk/dv
kernel at key rows (``key_docs``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton

from attn_core.triton_env import interpret_mode

from .backward import delta_kernel, dkv_kernel, dq_ds_kernel, dq_kernel
from .forward import fwd_kernel
from .planning import CSR, DsChunk, KernelConfig, KernelMask, chunk_slots, stored_ds_chunks

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer path is used
    _TensorDescriptor = None

__all__ = ["DELTA_ROWS", "LOG2E", "block_sparse_backward", "block_sparse_forward", "device_guard"]

LOG2E = 1.4426950408889634


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` the current CUDA device while kernels launch (Triton launches on the current
    one); switches only when it differs (a no-op for the CPU, the interpreter's tensors, and
    "cuda" without an index, which means the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _docs(bounds: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """The per-row bounds a kernel reads (HAS_DOCS), or any tensor standing in for the unread pointer."""
    return bounds if bounds is not None else fallback


def _check_mask(mask: KernelMask, seq_len_q: int, seq_len_k: int) -> None:
    """The bounds arrays have the shapes the kernels index ((2, Nq) query side, (2, Nk) key side),
    int32 and contiguous: a wrong one would be read out of bounds. No host reads."""
    if mask.key_docs is not None and mask.docs is None:
        raise ValueError("KernelMask.key_docs needs docs (the same mask seen from the queries)")
    for name, bounds, n in (("docs", mask.docs, seq_len_q), ("key_docs", mask.key_side_docs, seq_len_k)):
        if bounds is None:
            continue
        if bounds.dtype != torch.int32 or tuple(bounds.shape) != (2, n) or not bounds.is_contiguous():
            raise ValueError(
                f"KernelMask.{name} must be a contiguous int32 tensor of shape (2, {n}), "
                f"got {bounds.dtype} {tuple(bounds.shape)} (contiguous={bounds.is_contiguous()})"
            )


def block_sparse_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: CSR, mask: KernelMask, scale: float, cfg: KernelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Nq, H, D) in q.dtype and lse (B, H, Nq) fp32 (natural log, -inf for empty rows)."""
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    _check_mask(mask, Nq, Nk)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    bq, bk = csr.block_size
    table = csr.row_table(B, H)
    grid = (B * H * csr.num_query_blocks * (bq // cfg.fwd_m),)
    use_tma = cfg.tma and _has_tma(k, v)
    k_src = _tile_descriptor(k, cfg.fwd_n) if use_tma else k
    v_src = _tile_descriptor(v, cfg.fwd_n) if use_tma else v
    fwd_kernel[grid](
        q, k_src, v_src, out, lse, csr.col, table, _docs(mask.docs, csr.col),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Nq, Nk, H, H // Hkv, csr.num_query_blocks, mask.left, mask.right,
        scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, BANDED=mask.banded,
        HAS_DOCS=mask.docs is not None, TMA=use_tma, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )  # fmt: skip
    return out, lse


def _has_tma(*tensors: torch.Tensor) -> bool:
    """TMA tensor descriptors can load these: CUDA tensors on sm90+ (or Triton's interpreter, which
    emulates descriptors) with the 16-byte aligned base and strides TMA requires."""
    if _TensorDescriptor is None:
        return False
    t0 = tensors[0]
    if not interpret_mode() and not (t0.is_cuda and torch.cuda.get_device_capability(t0.device)[0] >= 9):
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors
    )


def _tile_descriptor(t: torch.Tensor, rows: int) -> Any:
    """A 4-D (B, N, heads, D) descriptor loading (1, rows, 1, D) tiles; rows past N read as zeros."""
    return _TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, t.shape[3]])


def block_sparse_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    csr: CSR,
    mask: KernelMask,
    scale: float,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped and typed like (q, k, v), from the forward's out and lse.

    Stored dS (when :func:`stored_ds_chunks` gives chunks): delta = rowsum(out * dout), then per
    chunk of (batch, kv head) units the column-parallel dk/dv kernel, which also writes dS, and the
    row-parallel dq = dS @ K kernel. Otherwise (recompute): the row-parallel dq kernel, which
    recomputes P and dP and stores delta, then the dk/dv kernel.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    _check_mask(mask, Nq, Nk)
    group = H // Hkv
    q, k, v, out, dout = (_last_contig(t) for t in (q, k, v, out, dout))
    delta = torch.empty(B, H, Nq, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    tma_kv = cfg.tma and _has_tma(k, v)
    chunks = stored_ds_chunks(csr, B, Hkv, group, q.element_size(), cfg)

    if not chunks:
        dq_kernel[(B * H * csr.num_query_blocks * (csr.block_size[0] // cfg.dq_m),)](
            q,
            _tile_descriptor(k, cfg.dq_n) if tma_kv else k,
            _tile_descriptor(v, cfg.dq_n) if tma_kv else v,
            out, dout, dq, lse, delta, csr.col, csr.row_table(B, H), _docs(mask.docs, csr.col),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Nq, Nk, H, group, csr.num_query_blocks, mask.left, mask.right, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, LAYOUT_BQ=csr.block_size[0],
            LAYOUT_BK=csr.block_size[1], BANDED=mask.banded, HAS_DOCS=mask.docs is not None, TMA=tma_kv,
            num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
        )  # fmt: skip
        everything = DsChunk(0, B * Hkv, 0, csr.num_key_blocks, 0, 0)
        order = csr.column_order(*csr.unit_grid(B * Hkv, Hkv), group)
        _launch_dkv(q, k, v, dout, dk, dv, lse, delta, None, csr, everything, order, mask, scale, cfg)
        return dq, dk, dv

    delta_kernel[(triton.cdiv(Nq, DELTA_ROWS), B * H)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), Nq, H, HEAD_DIM=D, BLOCK_M=DELTA_ROWS,
    )  # fmt: skip
    bq, bk = csr.block_size
    per_head_layout = csr.num_heads > 1
    # key-block ranges (one (batch, kv head) unit per chunk, its ranges in order): the unit's dq
    # adds up over them in an fp32 buffer of its query heads only, (Nq, group, D), copied into dq
    # after its last range (a whole fp32 dq would be 8 GiB more at 1M tokens x 16 heads)
    accumulate = chunks[0].c1 - chunks[0].c0 < csr.num_key_blocks
    dq_acc = torch.empty(Nq, group, D, device=q.device, dtype=torch.float32) if accumulate else dq
    tslot = csr.transposed_slots()
    slots = max(chunk_slots(c, per_head_layout, Hkv, group) for c in chunks)
    ds = _scratch(slots * bq * bk, q)
    ds_tma = cfg.tma and _has_tma(ds)
    ds_src = _scratch_descriptor(ds, bq, cfg.dqs_n, cfg.dqs_m) if ds_tma else ds
    k_src = _tile_descriptor(k, cfg.dqs_n) if tma_kv else k
    for c, (order, table) in zip(chunks, csr.chunk_tables(chunks, B, Hkv, group)):
        _launch_dkv(q, k, v, dout, dk, dv, lse, delta, ds, csr, c, order, mask, scale, cfg)
        b, hk = divmod(c.u0, Hkv)
        if accumulate and c.c0 == 0:
            dq_acc.zero_()
        # the buffer holds one unit: batch stride 0, its heads counted from the unit's first
        dq_strides = (0, dq_acc.stride(0), dq_acc.stride(1)) if accumulate else dq.stride()[:3]
        dq_ds_kernel[((c.u1 - c.u0) * group * csr.num_query_blocks * (bq // cfg.dqs_m),)](
            k_src, ds_src, dq_acc, csr.col, tslot, table, _docs(mask.docs, csr.col),
            k.stride(0), k.stride(1), k.stride(2),
            *dq_strides,
            Nq, Nk, H, group, csr.num_query_blocks, c.u0 * group, H if per_head_layout else 1, c.p1 - c.p0,
            c.p0, hk * group if accumulate else 0, mask.left, mask.right, scale,
            HEAD_DIM=D, BLOCK_M=cfg.dqs_m, BLOCK_N=cfg.dqs_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, BANDED=mask.banded,
            HAS_DOCS=mask.docs is not None, TMA=tma_kv, DS_TMA=ds_tma, ACCUMULATE=accumulate,
            num_warps=cfg.dqs_warps, num_stages=cfg.dqs_stages,
        )  # fmt: skip
        if accumulate and c.c1 == csr.num_key_blocks:
            dq[b, :, hk * group : (hk + 1) * group].copy_(dq_acc)
    return dq, dk, dv


# Rows per program of the delta kernel.
DELTA_ROWS = 64


def _scratch_descriptor(ds: torch.Tensor, bq: int, rows: int, cols: int) -> Any:
    """A descriptor over the scratch as (slots * Bk, Bq), moving (rows, cols) tiles."""
    ds2 = ds.view(-1, bq)
    return _TensorDescriptor(ds2, list(ds2.shape), list(ds2.stride()), [rows, cols])


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """The dS scratch: uninitialised (every value read was written first; tests fill it with NaN)."""
    return torch.empty(numel, device=like.device, dtype=like.dtype)


def _launch_dkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    ds: torch.Tensor | None,
    csr: CSR,
    chunk: DsChunk,
    order: torch.Tensor,
    mask: KernelMask,
    scale: float,
    cfg: KernelConfig,
) -> None:
    """The dk/dv kernel over the chunk's (batch, kv head) units and key blocks, taken in ``order``
    (:meth:`CSR.column_order` of them); writes dS into ``ds`` (at the chunk's slots) unless it is None."""
    _, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    bq, bk = csr.block_size
    per_head_layout = csr.num_heads > 1
    units = chunk.u1 - chunk.u0
    tma = cfg.tma and _has_tma(q, dout)
    # Without dS storage the pointer is never read (STORE_DS=False); delta stands in for it.
    ds_src: object = delta
    ds_tma = False
    if ds is not None:
        ds_tma = cfg.tma and _has_tma(ds)
        ds_src = _scratch_descriptor(ds, bq, cfg.dkv_n, cfg.dkv_m) if ds_tma else ds
    dkv_kernel[(units * (chunk.c1 - chunk.c0) * (bk // cfg.dkv_n),)](
        _tile_descriptor(q, cfg.dkv_m) if tma else q,
        k, v,
        _tile_descriptor(dout, cfg.dkv_m) if tma else dout,
        dk, dv, lse, delta, csr.ccol, csr.row, order, ds_src, _docs(mask.key_side_docs, csr.row),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        Nq, Nk, H, Hkv, group, csr.num_key_blocks, csr.num_key_blocks if per_head_layout else 0,
        chunk.u0, H if per_head_layout else 1, chunk.p1 - chunk.p0, chunk.p0, mask.left, mask.right,
        scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_M=cfg.dkv_m, BLOCK_N=cfg.dkv_n, LAYOUT_BQ=bq, LAYOUT_BK=bk, BANDED=mask.banded,
        HAS_DOCS=mask.key_side_docs is not None, TMA=tma, STORE_DS=ds is not None, DS_TMA=ds_tma,
        num_warps=cfg.dkv_warps, num_stages=cfg.dkv_stages,
    )  # fmt: skip
