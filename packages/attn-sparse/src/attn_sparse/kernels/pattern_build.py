"""Triton build of the bigbird layout: CSR and transposed CSR straight from the pattern parameters.

The torch builder of :func:`attn_sparse.patterns.bigbird` (its CPU path) issues ~60 small ops
when it runs on a GPU, and their host time, not the GPU work, bounds the build. This one issues
3 Triton kernels and 2 torch ops:

1. ``_count_kernel``: the length of every row, then ``torch.cumsum`` and one host read of nnz
   (the size of the outputs);
2. ``_expand_kernel``: the columns of every row, increasing, and a sort key per tile
   ``(head * nk + col) * nq + query block``; ``torch.sort`` of the keys groups the tiles by
   (head, key block) with the query blocks increasing;
3. ``_transpose_kernel``: the transposed CSR from the sorted keys (row ids, and column offsets by
   binary search), exactly what :meth:`BlockLayout.transposed_csr` computes by its own sort.

The count kernel hashes each row's random draws (the counter-based hash of
:mod:`attn_sparse._hash`, the same integer math as the torch builder) and compares them pairwise
(a few per row, typically) instead of sorting them: a draw counts once, at its first occurrence,
and only if it lies outside the row's intervals. It stores these "extras" (-1 elsewhere); the
expand kernel places each extra by the number of extras below it.

Row ``h * nq + q`` (query block q of head h) is the union of the global interval, the window
interval (as ``_Grid.global_interval`` / ``_Grid.window`` define them) and the row's random
draws. Merged, the intervals are A = [0, a_hi) (the global blocks, joined with the window when
they touch) and B = [b_lo, b_hi) (the window when it does not; else empty at a_hi). The
"extras" are the distinct draws outside A and B; in sorted order a row is A, the extras below
b_lo, B, the extras at or above b_hi, so each column's position follows from a_hi, the number of
extras below b_lo and the extra's rank. Every loop runs over a row in chunks, so any number of
key blocks (a global row holds all nk) and any number of draws is handled (the pairwise draw
comparisons grow with the square of the draws per row).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._hash import HASH_MUL, HASH_SHIFT, MASK32
from ..layout import _INT32_MAX

__all__ = ["bigbird_csr"]

# the hash constants of attn_sparse._hash, as compile-time constants of the kernels
_MASK32 = tl.constexpr(MASK32)
_MUL_0 = tl.constexpr(HASH_MUL[0])
_MUL_1 = tl.constexpr(HASH_MUL[1])
_SHIFT_0 = tl.constexpr(HASH_SHIFT[0])
_SHIFT_1 = tl.constexpr(HASH_SHIFT[1])
_SHIFT_2 = tl.constexpr(HASH_SHIFT[2])

# The 32-bit seed key travels as key - KEY_BIAS: always an int32 argument, whereas keys >= 2**31
# would be typed uint32 by Triton, a second signature (a compile) for half of all seeds.
KEY_BIAS = tl.constexpr(1 << 31)
# Draws compared pairwise per step (a DRAW_CHUNK x DRAW_CHUNK block of int32 comparisons).
DRAW_CHUNK = 64
# Columns a row program writes per loop step: rows are typically tens of blocks,
# global rows all nk (thousands), so a row loops rather than sizing its program by the longest.
ROW_CHUNK = 128
# Sorted tile keys (and key-block offsets) per program of _transpose_kernel.
TRANSPOSE_BLOCK = 1024
# Integer arguments are not specialised on (== 1, divisibility by 16), so a new N or new pattern
# parameters reuse the compiled kernels instead of compiling variants.
_GEOMETRY = ["seq_len", "block_q", "block_k", "window", "num_qb", "num_kb", "global_qb", "global_kb"]


@triton.jit
def _mix32(x):
    """attn_sparse._hash.mix32 on int64 values in [0, 2**32) (products stay below 2**63)."""
    x = x ^ (x >> _SHIFT_0)
    x = (x * _MUL_0) & _MASK32
    x = x ^ (x >> _SHIFT_1)
    x = (x * _MUL_1) & _MASK32
    return x ^ (x >> _SHIFT_2)


@triton.jit
def _draws(row, key, t, num_qb, num_kb):
    """Draws t (int32 tensor) of row = head * num_qb + q, as int32: attn_sparse._hash.random_blocks
    (int64 math). ``key``: the 32-bit seed key minus 2**31 (see KEY_BIAS)."""
    x = _mix32(_mix32(_mix32((row // num_qb) ^ (key.to(tl.int64) + KEY_BIAS)) ^ (row % num_qb)) ^ t.to(tl.int64))
    return ((x * num_kb) >> 32).to(tl.int32)


@triton.jit
def _row_intervals(q, seq_len, block_q, block_k, window, num_kb, global_qb, global_kb):
    """(a_hi, b_lo, b_hi) of query block q (int64): A = [0, a_hi), B = [b_lo, b_hi) disjoint, A first."""
    q_first = q * block_q
    g_hi = tl.where(q < global_qb, num_kb, global_kb)  # global query blocks read every key block
    w_lo = tl.maximum(q_first - window, 0) // block_k
    w_hi = tl.minimum(q_first + (block_q - 1 + window), seq_len - 1) // block_k + 1
    touch = w_lo <= g_hi
    a_hi = tl.where(touch, tl.maximum(g_hi, w_hi), g_hi)
    return a_hi, tl.where(touch, a_hi, w_lo), tl.where(touch, a_hi, w_hi)


@triton.jit
def _extras(row, key, t0, draws, num_qb, num_kb, a_hi, b_lo, b_hi, CHUNK: tl.constexpr):
    """(draws t0 .. t0 + CHUNK of a row, which of them are extras): an extra lies outside A and B
    and is the first occurrence of its value (no earlier draw of the row equals it)."""
    t = t0 + tl.arange(0, CHUNK)
    d = _draws(row, key, t, num_qb, num_kb)
    seen = tl.zeros([CHUNK], dtype=tl.int32)
    for s0 in range(0, t0 + CHUNK, CHUNK):  # chunks up to this one: earlier draws
        s = s0 + tl.arange(0, CHUNK)
        e = _draws(row, key, s, num_qb, num_kb)
        same = (e[None, :] == d[:, None]) & (s[None, :] < t[:, None])
        seen += tl.sum(same.to(tl.int32), axis=1)
    return d, (t < draws) & (seen == 0) & (d >= a_hi) & ((d < b_lo) | (d >= b_hi))


@triton.jit(do_not_specialize=["draws", *_GEOMETRY])
def _count_kernel(
    COUNTS, EXTRAS, key, draws, seq_len, block_q, block_k, window, num_qb, num_kb, global_qb, global_kb,
    CHUNK: tl.constexpr,
):  # fmt: skip
    """COUNTS: (rows + 1,) int32; [0] = 0, [1 + row] = the number of active tiles of row.
    EXTRAS: (rows, draws) int32; draw t of row where it is an extra, else -1."""
    row = tl.program_id(0).to(tl.int64)
    a_hi, b_lo, b_hi = _row_intervals(row % num_qb, seq_len, block_q, block_k, window, num_kb, global_qb, global_kb)
    n_extra = 0
    for t0 in range(0, draws, CHUNK):
        d, keep = _extras(row, key, t0, draws, num_qb, num_kb, a_hi, b_lo, b_hi, CHUNK)
        t = t0 + tl.arange(0, CHUNK)
        tl.store(EXTRAS + row * draws + t, tl.where(keep, d, -1), mask=t < draws)
        n_extra += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(COUNTS + 1 + row, (a_hi + (b_hi - b_lo) + n_extra).to(tl.int32))
    tl.store(COUNTS, 0, mask=row == 0)


@triton.jit
def _write_tiles(COL, KEYS, pos, c, mask, key_base, num_qb, q):
    """Columns c at CSR positions pos, and their transposition sort keys (key_base + c) * num_qb + q."""
    tl.store(COL + pos, c.to(tl.int32), mask=mask)
    tl.store(KEYS + pos, ((key_base + c) * num_qb + q).to(KEYS.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["draws", *_GEOMETRY])
def _expand_kernel(
    COL, KEYS, CROW_OUT, CROW, EXTRAS, draws, seq_len, block_q, block_k, window, num_qb, num_kb,
    global_qb, global_kb, CHUNK: tl.constexpr, DCHUNK: tl.constexpr,
):  # fmt: skip
    """COL, KEYS: (nnz,) the columns of every row and their sort keys; CROW (rows + 1,) int64 row
    offsets, copied to CROW_OUT as int32."""
    row = tl.program_id(0).to(tl.int64)
    q = row % num_qb
    key_base = (row // num_qb) * num_kb
    a_hi, b_lo, b_hi = _row_intervals(q, seq_len, block_q, block_k, window, num_kb, global_qb, global_kb)
    start = tl.load(CROW + row)
    tl.store(CROW_OUT + 1 + row, tl.load(CROW + 1 + row).to(tl.int32))
    tl.store(CROW_OUT, 0, mask=row == 0)
    # extras first: their count below b_lo places B
    below = 0
    ROW_EXTRAS = EXTRAS + row * draws
    for t0 in range(0, draws, DCHUNK):
        t = t0 + tl.arange(0, DCHUNK)
        d = tl.load(ROW_EXTRAS + t, mask=t < draws, other=-1)
        keep = d >= 0
        # an extra's rank among the row's extras = the extras of lower value (each counted once)
        rank = tl.zeros([DCHUNK], dtype=tl.int32)
        for s0 in range(0, draws, DCHUNK):
            e = tl.load(ROW_EXTRAS + s0 + tl.arange(0, DCHUNK), mask=s0 + tl.arange(0, DCHUNK) < draws, other=-1)
            rank += tl.sum(((e[None, :] >= 0) & (e[None, :] < d[:, None])).to(tl.int32), axis=1)
        # position = interval columns before d + extras before d
        pos = start + a_hi + tl.where(d >= b_hi, b_hi - b_lo, 0) + rank
        _write_tiles(COL, KEYS, pos, d, keep, key_base, num_qb, q)
        below += tl.sum((keep & (d < b_lo)).to(tl.int32), axis=0)
    for c0 in range(0, a_hi, CHUNK):  # A = [0, a_hi): nothing precedes it
        c = c0 + tl.arange(0, CHUNK)
        _write_tiles(COL, KEYS, start + c, c, c < a_hi, key_base, num_qb, q)
    for c0 in range(b_lo, b_hi, CHUNK):  # B after A and the extras below b_lo
        c = c0 + tl.arange(0, CHUNK)
        _write_tiles(COL, KEYS, start + a_hi + below + (c - b_lo), c, c < b_hi, key_base, num_qb, q)


@triton.jit(do_not_specialize=["nnz", "num_cols", "num_qb", "steps"])
def _transpose_kernel(CCOL, ROWS, KEYS, nnz, num_cols, num_qb, steps, BLOCK: tl.constexpr):
    """KEYS: (nnz,) sorted tile keys col * num_qb + q (col = head * nk + key block). ROWS[i] = q of
    key i; CCOL[c] (c <= num_cols) = the number of keys below c * num_qb, by a binary search of
    ``steps`` >= bit_length(nnz) halvings."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ROWS + i, (tl.load(KEYS + i, mask=i < nnz, other=0) % num_qb).to(tl.int32), mask=i < nnz)
    want = i * num_qb
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.where(i <= num_cols, nnz, 0).to(tl.int64)  # lanes past num_cols search nothing
    for _ in range(steps):
        open_ = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(KEYS + mid, mask=open_, other=0) < want
        lo = tl.where(open_ & below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    tl.store(CCOL + i, lo.to(tl.int32), mask=i <= num_cols)


def bigbird_csr(
    seq_len: int,
    block_size: tuple[int, int],
    window: int,
    global_tokens: int,
    random_blocks: int,
    key: int,
    num_heads: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bigbird's (crow, col, ccol, rows), all int32, on ``device`` (CUDA; CPU tensors under
    TRITON_INTERPRET=1). Arguments as validated by :func:`attn_sparse.patterns.bigbird`;
    ``key`` is the hash key of the seed (:func:`attn_sparse._hash.seed_key`).

    crow (num_heads * nq + 1,), col (nnz,) increasing per row; ccol (num_heads * nk + 1,),
    rows (nnz,) increasing per key block: what :meth:`BlockLayout.transposed_csr` returns.
    """
    # kernels launch on the current CUDA device: make it the layout's
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        bq, bk = block_size
        nq, nk = -(-seq_len // bq), -(-seq_len // bk)
        rows = num_heads * nq
        g = min(global_tokens, seq_len)
        # geometry scalars for _row_intervals; a window past the sequence reads what window N reads,
        # so clamping keeps every kernel sum small without changing the layout
        geometry = (seq_len, bq, bk, min(window, seq_len), nq, nk, -(-g // bq), -(-g // bk))
        counts = torch.empty(rows + 1, dtype=torch.int32, device=device)
        extras = torch.empty(rows, random_blocks, dtype=torch.int32, device=device)
        _count_kernel[(rows,)](counts, extras, key - KEY_BIAS.value, random_blocks, *geometry, CHUNK=DRAW_CHUNK)
        crow = torch.cumsum(counts, dim=0)  # int64
        nnz = int(crow[-1])  # the one host read: the size of the outputs
        if nnz > _INT32_MAX:
            raise ValueError(f"pattern has {nnz} active tiles; at most {_INT32_MAX} (int32 indices) are supported")
        # int32 keys when they fit: the sort moves half the bytes
        key_dtype = torch.int32 if num_heads * nk * nq <= _INT32_MAX else torch.int64
        col = torch.empty(nnz, dtype=torch.int32, device=device)
        keys = torch.empty(nnz, dtype=key_dtype, device=device)
        crow32 = torch.empty(rows + 1, dtype=torch.int32, device=device)
        _expand_kernel[(rows,)](
            col, keys, crow32, crow, extras, random_blocks, *geometry, CHUNK=ROW_CHUNK, DCHUNK=DRAW_CHUNK
        )
        keys = torch.sort(keys).values  # distinct keys: an unstable sort gives the one order
        num_cols = num_heads * nk
        ccol = torch.empty(num_cols + 1, dtype=torch.int32, device=device)
        tile_rows = torch.empty(nnz, dtype=torch.int32, device=device)
        grid = (triton.cdiv(max(nnz, num_cols + 1), TRANSPOSE_BLOCK),)
        _transpose_kernel[grid](ccol, tile_rows, keys, nnz, num_cols, nq, nnz.bit_length(), BLOCK=TRANSPOSE_BLOCK)
        return crow32, col, ccol, tile_rows
