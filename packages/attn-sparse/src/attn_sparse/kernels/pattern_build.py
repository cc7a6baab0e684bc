"""Triton build of the bigbird layout: CSR and transposed CSR straight from the pattern parameters.

The torch builder of :func:`attn_sparse.patterns.bigbird` (its CPU path) issues ~60 small ops
when it runs on a GPU, and their host time, not the GPU work, bounds the build. This one issues
3 Triton kernels, 2 torch ops and no sort:

1. ``_count_kernel``: the length of every row and of every column (head * nk + key block), then
   one ``torch.cumsum`` over both (the offsets); the outputs are sized by an upper bound on nnz,
   and nnz itself is read back once, after the last launch;
2. ``_expand_kernel``: the key blocks of every row, increasing; each random tile also leaves its
   query block in a scratch list of its column;
3. ``_transpose_kernel``: the query blocks of every column, increasing: exactly the transposed
   CSR that :meth:`BlockLayout.transposed_csr` computes by sorting.

The count kernel hashes each row's random draws (the counter-based hash of
:mod:`attn_sparse.hashing`, the same integer math as the torch builder) and compares them pairwise
(a few per row, typically) instead of sorting them: a draw counts once, at its first occurrence,
and only if it lies outside the row's intervals. It stores these "extras" (-1 elsewhere); the
expand kernel places each extra by the number of extras below it.

Columns have the same shape: the query blocks whose global or window interval holds key block j
are (at most) two intervals, found in closed form (``_col_intervals``), and the column's extras
are the rows that drew j. ``_place_line`` writes a row or a column from its intervals and extras.

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

import torch
import triton
import triton.language as tl

from ..hashing import HASH_MUL, HASH_SHIFT, MASK32
from ..tile_index import aligned_sections, check_tile_count
from .launch import device_guard

__all__ = ["bigbird_csr", "expand_runs", "window_csr"]

# the hash constants of attn_sparse.hashing, as compile-time constants of the kernels
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
# Columns a run program writes per loop step (runs are a row's intervals: tens to thousands of blocks).
RUN_CHUNK = 256
# Integer arguments are not specialised on (== 1, divisibility by 16), so a new N or new pattern
# parameters reuse the compiled kernels instead of compiling variants.
_GEOMETRY = ["seq_len", "block_q", "block_k", "window", "num_qb", "num_kb", "global_qb", "global_kb"]


@triton.jit
def _mix32(x):
    """attn_sparse.hashing.mix32 on int64 values in [0, 2**32) (products stay below 2**63)."""
    x = x ^ (x >> _SHIFT_0)
    x = (x * _MUL_0) & _MASK32
    x = x ^ (x >> _SHIFT_1)
    x = (x * _MUL_1) & _MASK32
    return x ^ (x >> _SHIFT_2)


@triton.jit
def _draws(row, key, t, num_qb, num_kb):
    """Draws t (int32 tensor) of row = head * num_qb + q, as int32: attn_sparse.hashing.random_blocks
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


@triton.jit(do_not_specialize=["draws", "rows", "num_cols", *_GEOMETRY])
def _count_kernel(
    COUNTS, EXTRAS, EXTRA_SLOTS, key, draws, rows, num_cols, seq_len, block_q, block_k, window, num_qb,
    num_kb, global_qb, global_kb, CHUNK: tl.constexpr,
):  # fmt: skip
    """COUNTS: (1 + rows + num_cols,) int32, zeroed: [1 + row] = the tiles of row, [1 + rows + c] =
    the tiles of column c = head * nk + key block. EXTRAS: (rows, draws) int32; draw t of row
    where it is an extra, else -1. EXTRA_SLOTS (num_cols,) int32, zeroed: the extras of column c.
    Program p counts row p (p < rows) and column p's intervals (p < num_cols)."""
    p = tl.program_id(0).to(tl.int64)
    if p < rows:
        a_hi, b_lo, b_hi = _row_intervals(p % num_qb, seq_len, block_q, block_k, window, num_kb, global_qb, global_kb)
        n_extra = 0
        for t0 in range(0, draws, CHUNK):
            d, keep = _extras(p, key, t0, draws, num_qb, num_kb, a_hi, b_lo, b_hi, CHUNK)
            t = t0 + tl.arange(0, CHUNK)
            tl.store(EXTRAS + p * draws + t, tl.where(keep, d, -1), mask=t < draws)
            # the extra is a tile of column c too (columns of distinct extras differ: no clash)
            c = (p // num_qb) * num_kb + d
            tl.atomic_add(COUNTS + 1 + rows + c, 1, mask=keep)
            tl.atomic_add(EXTRA_SLOTS + c, 1, mask=keep)
            n_extra += tl.sum(keep.to(tl.int32), axis=0)
        tl.store(COUNTS + 1 + p, (a_hi + (b_hi - b_lo) + n_extra).to(tl.int32))
    if p < num_cols:
        a_hi, b_lo, b_hi = _col_intervals(p % num_kb, seq_len, block_q, block_k, window, num_qb, global_qb, global_kb)
        tl.atomic_add(COUNTS + 1 + rows + p, (a_hi + (b_hi - b_lo)).to(tl.int32))


@triton.jit
def _col_intervals(j, seq_len, block_q, block_k, window, num_qb, global_qb, global_kb):
    """(a_hi, b_lo, b_hi) of key block j (int64): the query blocks whose global or window interval
    (_row_intervals) holds j are A = [0, a_hi) and B = [b_lo, b_hi), disjoint, A first.

    Key blocks below global_kb are read by every row; others by the global rows [0, global_qb) and
    the rows whose window holds j, q in [w_lo, w_hi) (window ends never decrease with q):
    w_hi = the first q with q * Bq + Bq - 1 + window >= j * Bk, w_lo = the first q whose window
    starts past j, i.e. q * Bq - window >= (j + 1) * Bk.
    """
    x = j * block_k - window
    w_lo = tl.where(x > 0, x // block_q, 0)
    w_hi = tl.minimum(((j + 1) * block_k + window + block_q - 1) // block_q, num_qb)
    w_hi = tl.maximum(w_hi, w_lo)
    touch = w_lo <= global_qb
    a_hi = tl.where(j < global_kb, num_qb, tl.where(touch, tl.maximum(global_qb, w_hi), global_qb))
    separate = (j >= global_kb) & ~touch
    return a_hi, tl.where(separate, w_lo, a_hi), tl.where(separate, w_hi, a_hi)


@triton.jit
def _place_line(OUT, start, a_hi, b_lo, b_hi, EXTRA, n_extra, cap, CHUNK: tl.constexpr, DCHUNK: tl.constexpr):
    """Write one sorted CSR line (a row's key blocks or a key block's query blocks) at OUT + start:
    the intervals A = [0, a_hi) and B = [b_lo, b_hi) and the extras EXTRA[0:n_extra] (values
    outside A and B, distinct, any order; -1 entries are skipped). In sorted order the line is A,
    the extras below b_lo, B, the extras at or above b_hi: each value's position follows from a_hi,
    the number of extras below b_lo and the extra's rank among the extras. Positions at or past
    ``cap`` (OUT's length) are not written (bigbird_csr then builds again at the exact size)."""
    below = 0
    for t0 in range(0, n_extra, DCHUNK):
        t = t0 + tl.arange(0, DCHUNK)
        d = tl.load(EXTRA + t, mask=t < n_extra, other=-1)
        keep = d >= 0
        # an extra's rank among the line's extras = the extras of lower value (each counted once)
        rank = tl.zeros([DCHUNK], dtype=tl.int32)
        for s0 in range(0, n_extra, DCHUNK):
            s = s0 + tl.arange(0, DCHUNK)
            e = tl.load(EXTRA + s, mask=s < n_extra, other=-1)
            rank += tl.sum(((e[None, :] >= 0) & (e[None, :] < d[:, None])).to(tl.int32), axis=1)
        pos = start + a_hi + tl.where(d >= b_hi, b_hi - b_lo, 0) + rank
        tl.store(OUT + pos, d.to(tl.int32), mask=keep & (pos < cap))
        below += tl.sum((keep & (d < b_lo)).to(tl.int32), axis=0)
    for c0 in range(0, a_hi, CHUNK):  # A = [0, a_hi): nothing precedes it
        c = c0 + tl.arange(0, CHUNK)
        tl.store(OUT + start + c, c.to(tl.int32), mask=(c < a_hi) & (start + c < cap))
    for c0 in range(b_lo, b_hi, CHUNK):  # B after A and the extras below b_lo
        c = c0 + tl.arange(0, CHUNK)
        pos = start + a_hi + below + (c - b_lo)
        tl.store(OUT + pos, c.to(tl.int32), mask=(c < b_hi) & (pos < cap))


@triton.jit(do_not_specialize=["rows", "draws", "cap", *_GEOMETRY])
def _expand_kernel(
    COL, CROW_OUT, CROW, EXTRAS, XROWS, EXTRA_SLOTS, rows, draws, cap, seq_len, block_q, block_k, window,
    num_qb, num_kb, global_qb, global_kb, CHUNK: tl.constexpr, DCHUNK: tl.constexpr,
):  # fmt: skip
    """COL (nnz,): the key blocks of every row, increasing; CROW (rows + 1 + num_cols,) int64: row
    offsets (copied to CROW_OUT as int32), then nnz + the column offsets (CROW[rows:], see
    bigbird_csr). Each extra (row, key block c) also writes its query block into the first slots
    of column c's segment of XROWS, at a slot taken by counting EXTRA_SLOTS[c] down: the column
    kernel's extras, in any order. COL and XROWS hold ``cap`` values: nothing is written past them."""
    row = tl.program_id(0).to(tl.int64)
    q = row % num_qb
    a_hi, b_lo, b_hi = _row_intervals(q, seq_len, block_q, block_k, window, num_kb, global_qb, global_kb)
    start = tl.load(CROW + row)
    tl.store(CROW_OUT + 1 + row, tl.load(CROW + 1 + row).to(tl.int32))
    tl.store(CROW_OUT, 0, mask=row == 0)
    ROW_EXTRAS = EXTRAS + row * draws
    _place_line(COL, start, a_hi, b_lo, b_hi, ROW_EXTRAS, draws, cap, CHUNK, DCHUNK)
    CCOL = CROW + rows  # a pointer offset here, not a view: Triton specialises pointers on alignment
    nnz = tl.load(CCOL)
    for t0 in range(0, draws, DCHUNK):
        t = t0 + tl.arange(0, DCHUNK)
        d = tl.load(ROW_EXTRAS + t, mask=t < draws, other=-1)
        keep = d >= 0
        c = (row // num_qb) * num_kb + d
        slot = tl.atomic_add(EXTRA_SLOTS + c, -1, mask=keep) - 1
        at = tl.load(CCOL + c, mask=keep, other=0) - nnz + slot
        tl.store(XROWS + at, q.to(tl.int32), mask=keep & (at < cap))


@triton.jit(do_not_specialize=["rows", "num_cols", "cap", *_GEOMETRY])
def _transpose_kernel(
    ROWS, CCOL_OUT, OFFSETS, XROWS, rows, num_cols, cap, seq_len, block_q, block_k, window, num_qb, num_kb,
    global_qb, global_kb, CHUNK: tl.constexpr, DCHUNK: tl.constexpr,
):  # fmt: skip
    """ROWS (nnz,): the query blocks of every column (head * nk + key block), increasing;
    CCOL = OFFSETS[rows:] (num_cols + 1,) int64: nnz + the column offsets (CCOL[0] = nnz), written to
    CCOL_OUT as int32 offsets. A column is its intervals (_col_intervals) and its extras,
    XROWS[offset:offset + E]. ROWS and XROWS hold ``cap`` values: nothing is read or written past them."""
    col = tl.program_id(0).to(tl.int64)
    a_hi, b_lo, b_hi = _col_intervals(col % num_kb, seq_len, block_q, block_k, window, num_qb, global_qb, global_kb)
    CCOL = OFFSETS + rows
    nnz = tl.load(CCOL)
    start = tl.load(CCOL + col) - nnz
    end = tl.load(CCOL + col + 1) - nnz
    tl.store(CCOL_OUT + 1 + col, end.to(tl.int32))
    tl.store(CCOL_OUT, 0, mask=col == 0)
    # a line past the buffers (nnz > cap: built again at the exact size) reads no extras
    n_extra = tl.where(end <= cap, end - start - a_hi - (b_hi - b_lo), 0)
    _place_line(ROWS, start, a_hi, b_lo, b_hi, XROWS + start, n_extra, cap, CHUNK, DCHUNK)


@triton.jit(do_not_specialize=["step"])
def _runs_kernel(COL, BEGIN, START, LENGTH, step, CHUNK: tl.constexpr):
    """COL[BEGIN[r] + i] = START[r] + i * step for i < LENGTH[r]: program r writes run r."""
    r = tl.program_id(0)
    begin = tl.load(BEGIN + r).to(tl.int64)
    first = tl.load(START + r)
    length = tl.load(LENGTH + r)
    for i0 in range(0, length, CHUNK):
        i = i0 + tl.arange(0, CHUNK)
        tl.store(COL + begin + i, (first + i * step).to(tl.int32), mask=i < length)


def expand_runs(begin: torch.Tensor, start: torch.Tensor, length: torch.Tensor, step: int, nnz: int) -> torch.Tensor:
    """col (nnz,) int32 with col[begin[r] + i] = start[r] + i * step for i < length[r].

    begin, start, length: (runs,) int32 on one device (CUDA; CPU under TRITON_INTERPRET=1), the
    runs disjoint and covering [0, nnz) (as :func:`attn_sparse.layout._expand_intervals` lays
    them out); one launch, where torch needs a repeat_interleave, an arange and an add.
    """
    col = torch.empty(nnz, dtype=torch.int32, device=begin.device)
    if begin.numel():
        with device_guard(begin.device):
            _runs_kernel[(begin.numel(),)](col, begin, start, length, step, CHUNK=RUN_CHUNK)
    return col


def _floor_sum_host(n: int, m: int, a: int, b: int) -> int:
    """sum((a * i + b) // m for i in range(n)) for m >= 1 and a, b >= 0, in O(log) steps
    (the classic floor-sum recursion: reduce a, b below m, then swap the roles of a and m)."""
    total = 0
    while n > 0:
        total += n * (n - 1) // 2 * (a // m) + n * (b // m)
        a, b = a % m, b % m
        y = a * n + b
        if y < m:
            break
        n, b = divmod(y, m)
        m, a = a, m
    return total


@triton.jit
def _floor_sum(n, m, a, b):
    """_floor_sum_host on int64 scalars (n <= 0 gives 0)."""
    total = n * 0
    while n > 0:
        total += n * (n - 1) // 2 * (a // m) + n * (b // m)
        a = a % m
        b = b % m
        y = a * n + b
        done = y < m
        n = tl.where(done, 0, y // m)
        b = tl.where(done, b, y % m)
        swap = tl.where(done, m, a)  # a > 0 here unless done, so m stays >= 1
        a = tl.where(done, a, m)
        m = swap
    return total


def _window_offset_host(q: int, seq_len: int, block_q: int, block_k: int, window: int, num_kb: int) -> int:
    """Tiles of local_window rows 0 .. q - 1: sum of hi(i) - lo(i), with lo(i) = max(i * Bq - w, 0) // Bk
    and hi(i) = min(i * Bq + Bq - 1 + w, N - 1) // Bk + 1 (as ``_Grid.window``). Rows before q0
    have lo = 0 and rows from q1 on have hi = nk; in between both are floor sums."""
    q0 = window // block_q + 1
    lo_sum = _floor_sum_host(q - q0, block_k, block_q, block_q * q0 - window)
    q1 = max(0, -(-(seq_len - block_q - window) // block_q))
    qa = min(q, q1)
    hi_sum = qa + _floor_sum_host(qa, block_k, block_q, block_q - 1 + window) + max(0, q - q1) * num_kb
    return hi_sum - lo_sum


@triton.jit
def _window_offset(q, seq_len, block_q, block_k, window, num_kb):
    """_window_offset_host on int64 scalars."""
    q0 = window // block_q + 1
    lo_sum = _floor_sum(q - q0, block_k, block_q, block_q * q0 - window)
    x = seq_len - block_q - window
    q1 = tl.where(x > 0, (x + block_q - 1) // block_q, 0)
    qa = tl.minimum(q, q1)
    hi_sum = qa + _floor_sum(qa, block_k, block_q, block_q - 1 + window) + tl.maximum(q - q1, 0) * num_kb
    return hi_sum - lo_sum


@triton.jit(do_not_specialize=["seq_len", "block_q", "block_k", "window", "num_kb", "nnz"])
def _window_kernel(CROW, COL, seq_len, block_q, block_k, window, num_kb, nnz, CHUNK: tl.constexpr):
    """local_window's CSR (bigbird's rows without global or random blocks): program q writes row q,
    at a closed-form offset (the tiles of the rows before it)."""
    q = tl.program_id(0).to(tl.int64)
    seq_len = seq_len.to(tl.int64)
    block_q = block_q.to(tl.int64)
    block_k = block_k.to(tl.int64)
    window = window.to(tl.int64)
    num_kb = num_kb.to(tl.int64)
    a_hi, b_lo, b_hi = _row_intervals(q, seq_len, block_q, block_k, window, num_kb, 0, 0)
    start = _window_offset(q, seq_len, block_q, block_k, window, num_kb)
    tl.store(CROW + 1 + q, (start + a_hi + (b_hi - b_lo)).to(tl.int32))
    tl.store(CROW, 0, mask=q == 0)
    _place_line(COL, start, a_hi, b_lo, b_hi, COL, 0, nnz, CHUNK, CHUNK)  # no extras: COL is never read


def window_csr(
    seq_len: int, block_size: tuple[int, int], window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """local_window's (crow, col), int32, on ``device`` (CUDA; CPU tensors under TRITON_INTERPRET=1)
    in one launch and one allocation, with no host read: the tile count is a closed-form sum."""
    bq, bk = block_size
    nq, nk = -(-seq_len // bq), -(-seq_len // bk)
    w = min(window, seq_len)  # a window past the sequence reads what window N reads
    nnz = _window_offset_host(nq, seq_len, bq, bk, w, nk)
    check_tile_count(nnz)
    at = aligned_sections([nq + 1, nnz])
    out = torch.empty(at[-1], dtype=torch.int32, device=device)
    crow, col = out[: nq + 1], out[at[1] : at[1] + nnz]
    with device_guard(device):
        _window_kernel[(nq,)](crow, col, seq_len, bq, bk, w, nk, nnz, CHUNK=ROW_CHUNK)
    return crow, col


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
    ``key`` is the hash key of the seed (:func:`attn_sparse.hashing.seed_key`).

    crow (num_heads * nq + 1,), col (nnz,) increasing per row; ccol (num_heads * nk + 1,),
    rows (nnz,) increasing per key block: what :meth:`BlockLayout.transposed_csr` returns.

    The outputs are sized by an upper bound on nnz (:func:`bigbird_tile_bound`), so every launch
    is queued before the one host read of nnz, which then waits for the whole build instead of
    stalling the GPU between the count and the writes while the host sizes and launches them.
    Where the bound is too large to allocate freely, the build reads nnz first, as it would
    have to where a bound were ever short (then it builds again at the exact size).
    """
    bound = bigbird_tile_bound(seq_len, block_size, window, global_tokens, random_blocks, num_heads)
    built = _bigbird_csr(seq_len, block_size, window, global_tokens, random_blocks, key, num_heads, device, bound)
    if built is None:  # the bound was short: size by the exact count instead
        built = _bigbird_csr(seq_len, block_size, window, global_tokens, random_blocks, key, num_heads, device, None)
    if built is None:
        raise RuntimeError("bigbird build: an exactly sized build overflowed (a bug; please report it)")
    return built


# Bounds above this many tiles (256 MiB of int32 per CSR) are not allocated up front: at that size
# the host read's stall is a small part of the build, and a loose bound would waste memory.
BOUND_ALLOCATION_MAX_TILES = 1 << 26


def bigbird_tile_bound(
    seq_len: int, block_size: tuple[int, int], window: int, global_tokens: int, random_blocks: int, num_heads: int
) -> int:
    """An upper bound on bigbird's active tiles, from its parameters alone: a global query block
    reads every key block; any other reads the global key blocks, the key blocks its window
    (Bq + 2 * window tokens) touches and its distinct random draws."""
    bq, bk = block_size
    nq, nk = -(-seq_len // bq), -(-seq_len // bk)
    g = min(global_tokens, seq_len)
    gq, gk = min(-(-g // bq), nq), -(-g // bk)
    window_blocks = -(-(bq + 2 * min(window, seq_len)) // bk) + 1
    per_row = min(nk, gk + window_blocks + random_blocks)
    return num_heads * (gq * nk + (nq - gq) * per_row)


def _bigbird_csr(
    seq_len: int,
    block_size: tuple[int, int],
    window: int,
    global_tokens: int,
    random_blocks: int,
    key: int,
    num_heads: int,
    device: torch.device,
    bound: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One build with the index arrays sized by ``bound`` (None or over
    BOUND_ALLOCATION_MAX_TILES: by nnz, read from the GPU first); None when nnz exceeds it."""
    with device_guard(device):
        bq, bk = block_size
        nq, nk = -(-seq_len // bq), -(-seq_len // bk)
        rows, num_cols = num_heads * nq, num_heads * nk
        g = min(global_tokens, seq_len)
        # geometry scalars for _row_intervals; a window past the sequence reads what window N reads,
        # so clamping keeps every kernel sum small without changing the layout
        geometry = (seq_len, bq, bk, min(window, seq_len), nq, nk, -(-g // bq), -(-g // bk))
        # one zeroed buffer: [0 | row counts | column counts], then the column extra slots (aligned)
        at = aligned_sections([1 + rows + num_cols, num_cols])
        zeroed = torch.zeros(at[-1], dtype=torch.int32, device=device)
        counts, extra_slots = zeroed[: 1 + rows + num_cols], zeroed[at[1] : at[1] + num_cols]
        extras = torch.empty(rows, random_blocks, dtype=torch.int32, device=device)
        _count_kernel[(max(rows, num_cols),)](
            counts, extras, extra_slots, key - KEY_BIAS.value, random_blocks, rows, num_cols, *geometry,
            CHUNK=DRAW_CHUNK,
        )  # fmt: skip
        offsets = torch.cumsum(counts, dim=0)  # int64: row offsets, then nnz + column offsets
        nnz: int | None = None
        if bound is None or bound > BOUND_ALLOCATION_MAX_TILES:
            nnz = int(offsets[rows])  # the host read, before sizing the outputs
            check_tile_count(nnz)
            bound = nnz
        # one allocation per CSR (a layout may drop its cached transposed CSR and keep the CSR);
        # the index arrays start 16-byte aligned (see aligned_sections)
        at_r, at_c = aligned_sections([rows + 1, bound]), aligned_sections([num_cols + 1, bound])
        csr = torch.empty(at_r[-1], dtype=torch.int32, device=device)
        csc = torch.empty(at_c[-1], dtype=torch.int32, device=device)
        col_extras = torch.empty(bound, dtype=torch.int32, device=device)
        _expand_kernel[(rows,)](
            csr[at_r[1] :], csr, offsets, extras, col_extras, extra_slots, rows, random_blocks, bound, *geometry,
            CHUNK=ROW_CHUNK, DCHUNK=DRAW_CHUNK,
        )  # fmt: skip
        _transpose_kernel[(num_cols,)](
            csc[at_c[1] :], csc, offsets, col_extras, rows, num_cols, bound, *geometry, CHUNK=ROW_CHUNK,
            DCHUNK=DRAW_CHUNK,
        )  # fmt: skip
        if nnz is None:
            nnz = int(offsets[rows])  # the host read, after every launch
            if nnz > bound:
                return None
            check_tile_count(nnz)
        return csr[: rows + 1], csr[at_r[1] : at_r[1] + nnz], csc[: num_cols + 1], csc[at_c[1] : at_c[1] + nnz]
