"""Attention over strided-row sequences of packed tensors, in place, no copies: the Triton path of
packed dilated attention (:mod:`attn_core.packed_views`).

A :class:`StridedSequences` lists sequences s of rows ``starts[s] + t * stride`` (t < lengths[s])
of packed q (N, H, D) and k, v (N, Hkv, D), each with its query heads ``q_head0[s] + i * q_hs``
(i < q_hn) and kv heads ``kv_head0[s] + (i // (q_hn // kv_hn)) * kv_hs`` (native GQA). Attention runs
within each sequence (causal by t when asked), keys where ``key_padding_mask`` is True excluded.
The (row, head) pairs of different sequences must be distinct (what the dilated plan gives: a
group selects each (position, head) at most once), so every result is read-modified-written by one
program: :func:`forward_` stores or LSE-merges out / LSE at the rows, :func:`backward_` adds dq,
dk, dv at them, from the final (merged) out's :func:`row_delta` and LSE (exact for merged groups).

Needs triton: compiled on CUDA, or the interpreter on the CPU (TRITON_INTERPRET=1), see
:func:`unsupported_reasons`. The tile tables are built once per plan on the host; a launch is one
program per (tile, head), so its size follows the rows, not the number of sequences. The
forward's key tiles inside a sequence load through TMA tensor descriptors where K and V allow
them (:func:`descriptor_reasons`: Hopper or newer, 16-byte aligned base and strides); otherwise
every tile takes masked pointer loads, with the same results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .triton_env import interpret_mode, triton_installed

__all__ = [
    "BWD_BLOCK",
    "BWD_STAGES",
    "BWD_STEP",
    "FWD_BLOCK_M",
    "FWD_BLOCK_N",
    "FWD_STAGES",
    "MIN_DESCRIPTOR_TRITON",
    "StridedSequences",
    "backward_",
    "descriptor_reasons",
    "forward_",
    "row_delta",
    "stacked_sequences",
    "strided_sequences",
    "unsupported_reasons",
]

# Query rows per forward program and keys per inner step (D <= 128 on an H100: 8 warps), and the
# software-pipelining depth of its key loads. Measured on an H100 (D=128, bf16, packed LongNet
# batch, tools/probe_packed_route.py): 128 keys in 3 stages 8.0 ms vs 64 keys in 2 stages 8.9 ms.
# A device whose shared memory cannot hold them takes fewer stages, then fewer keys (:func:`_fwd_pipeline`).
FWD_BLOCK_M = 128
FWD_BLOCK_N = 128
FWD_STAGES = 3
# Rows per backward program (key rows for dk/dv, query rows for dq), per inner step (query rows
# for dk/dv, key rows for dq), and pipelining depth: larger tiles or 3 stages measured 1.3-2.2x
# slower on the H100.
BWD_BLOCK = 64
BWD_STEP = 64
BWD_STAGES = 2
DELTA_BLOCK_ROWS = 32
# The tile sizes above fit shared memory up to this head dim (measured on an H100 at 64 and 128);
# larger head dims take the gathered varlen path.
MAX_HEAD_DIM = 128
# The oldest triton whose host tensor descriptors (4-d blocks, TMA on Hopper and in the interpreter)
# these kernels were verified with; older ones take the pointer loads.
MIN_DESCRIPTOR_TRITON = (3, 6)


@dataclass(frozen=True)
class StridedSequences:
    """Sequences of strided rows with their heads, and the tile tables the kernels walk.

    starts: int64 (S,); lengths, q_head0, kv_head0: int32 (S,); fwd_tiles / bwd_tiles: int32 pairs
    (sequence, first row) per FWD_BLOCK_M / BWD_BLOCK rows, longest sequences first; all on the device.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    q_head0: torch.Tensor
    kv_head0: torch.Tensor
    fwd_tiles: tuple[torch.Tensor, torch.Tensor]
    bwd_tiles: tuple[torch.Tensor, torch.Tensor]
    stride: int
    q_hs: int
    q_hn: int
    kv_hs: int
    kv_hn: int


def _tiles(lengths: torch.Tensor, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first row) of every ``block`` rows, the longest sequences' tiles first (the
    programs with the most keys start first, so the last wave is short ones)."""
    per = -(-lengths.long() // block)
    order = torch.argsort(lengths.long(), descending=True, stable=True)
    seq = torch.repeat_interleave(order, per[order])
    first = torch.cumsum(per[order], 0) - per[order]
    m0 = (torch.arange(seq.numel()) - torch.repeat_interleave(first, per[order])) * block
    return seq.to(torch.int32).to(device), m0.to(torch.int32).to(device)


def strided_sequences(
    starts: torch.Tensor,
    lengths: torch.Tensor,
    q_head0: torch.Tensor,
    kv_head0: torch.Tensor,
    stride: int,
    heads: tuple[int, int, int, int],
    device: torch.device,
) -> StridedSequences:
    """A :class:`StridedSequences` from host int tensors (S,) (sequences of length 0 are dropped).

    heads: (q_hs, q_hn, kv_hs, kv_hn) with q_hn a multiple of kv_hn.
    """
    q_hs, q_hn, kv_hs, kv_hn = heads
    if stride < 1 or q_hn < 1 or kv_hn < 1 or q_hn % kv_hn:
        raise ValueError(f"strided_sequences: need stride >= 1 and q_hn a multiple of kv_hn, got {stride}, {heads}")
    keep = lengths > 0
    lengths = lengths[keep]
    return StridedSequences(
        starts=starts[keep].to(torch.int64).to(device),
        lengths=lengths.to(torch.int32).to(device),
        q_head0=q_head0[keep].to(torch.int32).to(device),
        kv_head0=kv_head0[keep].to(torch.int32).to(device),
        fwd_tiles=_tiles(lengths, FWD_BLOCK_M, device),
        bwd_tiles=_tiles(lengths, BWD_BLOCK, device),
        stride=stride,
        q_hs=q_hs,
        q_hn=q_hn,
        kv_hs=kv_hs,
        kv_hn=kv_hn,
    )


def stacked_sequences(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]],
    stride: int,
    heads: tuple[int, int, int, int],
    device: torch.device,
) -> StridedSequences | None:
    """One table of every part's sequences: parts (starts (S_i,), lengths (S_i,) or one 0-d length for
    all, q_head0, kv_head0) on the host sharing ``stride`` and heads (q_hs, q_hn, kv_hs, kv_hn); None
    when no sequence has rows."""
    starts = torch.cat([s for s, _, _, _ in parts])
    lengths = torch.cat([n.expand_as(s) for s, n, _, _ in parts])
    if not int(lengths.sum()):
        return None
    q_head0 = torch.cat([torch.full_like(s, h) for s, _, h, _ in parts])
    kv_head0 = torch.cat([torch.full_like(s, h) for s, _, _, h in parts])
    return strided_sequences(starts, lengths, q_head0, kv_head0, stride, heads, device)


def unsupported_reasons(q: torch.Tensor) -> list[str]:
    """Why the kernels cannot take q's device, dtype or head dim (empty: they can)."""
    reasons = []
    if not triton_installed():
        reasons.append("triton is not installed")
    if q.device.type == "cuda":
        if interpret_mode():
            reasons.append("TRITON_INTERPRET is set: the interpreter runs CPU tensors only")
        if q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"the CUDA kernels take float16/bfloat16, got {q.dtype}")
    else:
        if not (q.device.type == "cpu" and interpret_mode()):
            reasons.append(f"runs on CUDA, or on the CPU under TRITON_INTERPRET=1; got device {q.device}")
        if q.dtype not in (torch.float16, torch.float32):
            reasons.append(f"the interpreter runs float16/float32, got {q.dtype}")
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        reasons.append(f"head dim must be 1..{MAX_HEAD_DIM}, got {D}")
    return reasons


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _warps(D: int, rows: int) -> int:
    return 8 if D * rows >= 128 * 128 else 4


def _fwd_pipeline(head_dim: int, element_size: int, shared_bytes: int) -> tuple[int, int]:
    """(keys per step, stages) of the forward: the first of FWD_BLOCK_N, 64, 32 keys (at most
    FWD_BLOCK_N), with the most stages up to FWD_STAGES, whose query tile and staged K/V tiles fit
    ``shared_bytes`` (32 keys in 1 stage, the smallest, when none does)."""
    row_bytes = _block_d(head_dim) * element_size
    for block_n in sorted({FWD_BLOCK_N, min(FWD_BLOCK_N, 64), min(FWD_BLOCK_N, 32)}, reverse=True):
        for stages in range(FWD_STAGES, 0, -1):
            if (FWD_BLOCK_M + 2 * block_n * stages) * row_bytes <= shared_bytes:
                return block_n, stages
    return min(FWD_BLOCK_N, 32), 1


@functools.lru_cache(maxsize=16)
def _shared_memory(device: torch.device) -> int:
    """Shared memory one program may use on a CUDA device, bytes (opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152))


def descriptor_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why the kernels cannot read these (N, H, D) views through TMA tensor descriptors (empty: they
    can): a triton before :data:`MIN_DESCRIPTOR_TRITON`, a GPU older than Hopper, a base or a row or
    head stride that is not a positive multiple of 16 bytes (expanded views have stride 0). The interpreter takes descriptors on any device."""
    reasons = []
    if _triton_version() < MIN_DESCRIPTOR_TRITON:
        reasons.append(f"tensor descriptors need triton >= {'.'.join(map(str, MIN_DESCRIPTOR_TRITON))}")
    for x in tensors:
        if x.device.type == "cuda" and not interpret_mode() and _capability(x.device) < (9, 0):
            reasons.append(f"TMA needs compute capability 9.0 or newer, got {_capability(x.device)}")
        size = x.element_size()
        if x.data_ptr() % 16 or any(st * size % 16 or st <= 0 for st in x.stride()[:2]):
            reasons.append(
                f"base and row/head strides must be positive multiples of 16 bytes, got {x.stride()} x {size} B"
            )
    return reasons


@functools.lru_cache(maxsize=1)
def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _descriptor(x: torch.Tensor, stride: int, rows: int) -> object:
    """A descriptor of x (N, Hx, D) seen as (ceil(N / stride), stride, Hx, D): row t of a sequence
    starting at a * stride + b is (a + t, b); blocks of ``rows`` rows, one head, BLOCK_D columns
    (zero past D). The kernels read only blocks inside a sequence, never past N."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, Hx, D = x.shape
    s_n, s_h = x.stride()[:2]
    return TensorDescriptor(x, [-(-N // stride), stride, Hx, D], [stride * s_n, s_n, s_h, 1], [rows, 1, 1, _block_d(D)])


def _pad_arg(mask: torch.Tensor | None, seqs: StridedSequences) -> torch.Tensor:
    # uint8 so the kernel compares bytes; an unused pointer (never read) when there is no mask
    return seqs.lengths if mask is None else mask.contiguous().view(torch.uint8)


def forward_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqs: StridedSequences,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    first: bool,
) -> None:
    """Attention of every sequence, stored (``first``: nothing there yet) or LSE-merged into out, lse.

    q: (N, H, D); k, v: (N, Hkv, D); out: (N, H, D) in q's dtype; lse: (N, H) fp32 (any strides, the
    last dim of q, k, v, out contiguous); key_padding_mask: (N,) bool (True = padding) or None.
    """
    if seqs.fwd_tiles[0].numel() == 0:
        return
    from .strided_kernels import fwd_kernel

    D = q.shape[-1]
    block_n, stages = FWD_BLOCK_N, FWD_STAGES  # the interpreter ignores stages
    if q.device.type == "cuda":
        block_n, stages = _fwd_pipeline(D, q.element_size(), _shared_memory(q.device))
    grid = (seqs.fwd_tiles[0].numel(), seqs.q_hn)
    tma = not descriptor_reasons(k, v)
    kd, vd = (_descriptor(x, seqs.stride, block_n) for x in (k, v)) if tma else (k, v)
    fwd_kernel[grid](
        q, k, v, kd, vd, out, lse, _pad_arg(key_padding_mask, seqs),
        *seqs.fwd_tiles, seqs.starts, seqs.lengths, seqs.q_head0, seqs.kv_head0,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], *lse.stride(),
        seqs.stride, seqs.q_hs, seqs.kv_hs, seqs.q_hn // seqs.kv_hn, scale * 1.4426950408889634,
        D=D, BLOCK_D=_block_d(D), BLOCK_M=FWD_BLOCK_M, BLOCK_N=block_n,
        IS_CAUSAL=is_causal, HAS_PAD=key_padding_mask is not None, FIRST=first, TMA=tma,
        num_warps=_warps(D, FWD_BLOCK_M), num_stages=stages,
    )  # fmt: skip


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dout * out) in fp32: (N, H) contiguous, from (N, H, D) views (last dim contiguous)."""
    from .strided_kernels import delta_kernel

    N, H, D = out.shape
    delta = torch.empty(N, H, dtype=torch.float32, device=out.device)
    if N * H:
        grid = (-(-(N * H) // DELTA_BLOCK_ROWS),)
        delta_kernel[grid](
            dout, out, delta, N * H, H, *dout.stride()[:2], *out.stride()[:2],
            D=D, BLOCK_D=_block_d(D), BLOCK_R=DELTA_BLOCK_ROWS,
        )  # fmt: skip
    return delta


def backward_(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    seqs: StridedSequences,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> None:
    """Add every sequence's (dq, dk, dv) into grads = (dq (N, H, D), dk, dv (N, Hkv, D)) in place.

    lse: the final (N, H) fp32 LSE; delta: :func:`row_delta` of dout and the final out (N, H, D);
    other arguments as in :func:`forward_`.
    """
    if seqs.bwd_tiles[0].numel() == 0:
        return
    from .strided_kernels import dkdv_kernel, dq_kernel

    dq, dk, dv = grads
    D, H = q.shape[-1], q.shape[1]
    pad = _pad_arg(key_padding_mask, seqs)
    tables = (*seqs.bwd_tiles, seqs.starts, seqs.lengths, seqs.q_head0, seqs.kv_head0)
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *dout.stride()[:2], *lse.stride())
    common = (seqs.stride, seqs.q_hs, seqs.kv_hs, seqs.q_hn // seqs.kv_hn, H, scale * 1.4426950408889634, scale)
    meta = dict(
        D=D, BLOCK_D=_block_d(D), IS_CAUSAL=is_causal, HAS_PAD=key_padding_mask is not None,
        num_warps=_warps(D, BWD_BLOCK), num_stages=BWD_STAGES,
    )  # fmt: skip
    tiles = seqs.bwd_tiles[0].numel()
    dkdv_kernel[(tiles, seqs.kv_hn)](
        q, k, v, dout, lse, delta, dk, dv, pad, *tables, *strides, *dk.stride()[:2], *dv.stride()[:2], *common,
        BLOCK_M=BWD_STEP, BLOCK_N=BWD_BLOCK, **meta,
    )  # fmt: skip
    dq_kernel[(tiles, seqs.q_hn)](
        q, k, v, dout, lse, delta, dq, pad, *tables, *strides, *dq.stride()[:2], *common,
        BLOCK_M=BWD_BLOCK, BLOCK_N=BWD_STEP, **meta,
    )  # fmt: skip
