"""Block-sparse attention patterns, built in O(active blocks) with vectorised torch ops.

Every pattern takes the sequence length in tokens and a block size (Bq, Bk) and returns a
:class:`~attn_sparse.layout.BlockLayout` with ceil(N / Bq) x ceil(N / Bk) blocks. Distances
(windows, global tokens) are in tokens: a tile is active when the token-level rule holds for at
least one (query, key) pair in it, so the tile pattern covers the token pattern. Patterns compose
with ``|`` (union) and ``&`` (intersection), e.g. ``local_window(N, 512) & causal(N)``.

Internally each pattern is a set of column intervals per query block row, which
:meth:`BlockLayout.from_intervals` turns into CSR without a global sort; no Python loop
runs over blocks.

``device=`` builds the layout where it will be used (default "cpu"): on a GPU the per-row
interval work runs as a few small ops (on the CPU while the row arrays are tiny, then one copy)
with at most one host read (the number of active tiles), and the O(active tiles) expansion of
the intervals into column indices is one Triton launch (:func:`attn_sparse.kernels.pattern_build.expand_runs`;
torch ops without Triton), so a layout for N = 1M tokens builds in about 2 ms on an H100
(docs/benchmarks/sparse_h100.md, layout build section); :func:`local_window` on CUDA is a single
Triton launch (:func:`attn_sparse.kernels.pattern_build.window_csr`). Builders also attach the transposed CSR
the backward reads whenever the pattern gives it for free (symmetric patterns with Bq == Bk,
causal), so :meth:`BlockLayout.transposed_csr` does not sort. :func:`bigbird`, whose random
blocks made that torch code its longest (about 60 small kernels), builds on CUDA with Triton
kernels instead (:mod:`attn_sparse.kernels.pattern_build`: 3 kernels and 2 torch ops, one host
read, no sort), which build its transposed CSR too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attn_core.config import DilatedConfig
from attn_core.triton_env import compiled_triton_available

from . import hashing
from .csr import expand_intervals, row_work_device
from .layout import (
    MAX_SEQ_LEN,
    BlockLayout,
    check_block_size,
    check_device,
    check_geometry,
    check_seq_len,
)
from .masks import TokenMask

__all__ = [
    "PATTERNS",
    "bigbird",
    "build_pattern",
    "causal",
    "dilated",
    "documents",
    "global_local",
    "hierarchical",
    "local_window",
    "longnet",
]


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


Device = torch.device | str

# Row-level interval entries a builder materialises (rows x intervals per row), int64 each: 2 GiB.
MAX_ROW_INTERVALS = 2**28


class _Grid:
    """Token geometry of a pattern: block rows/columns and each query block's token span.

    The layout goes to ``device``. Row-level tensors (one entry per block row and interval) live on
    ``self.rows_on``: the CPU while they are small (see :func:`row_work_device`), else ``device``.
    Builders call :meth:`plan` with their intervals per row before creating any; the per-row
    tensors are built on first use, so builders only pay for what they read.
    """

    def __init__(self, seq_len: object, block_size: object, device: object, num_heads: object = 1) -> None:
        self.n = check_seq_len("seq_len", seq_len)
        self.bq, self.bk = check_block_size(block_size)
        self.device = check_device(device)
        self.heads = _int("num_heads", num_heads, 1)
        self.nq = -(-self.n // self.bq)
        self.nk = -(-self.n // self.bk)
        check_geometry(self.heads, self.nq, self.nk)
        self.rows_on = row_work_device(self.device, 2 * self.nq)

    def distance(self, name: str, value: object) -> int:
        """A distance in tokens (window, global tokens), >= 0; beyond N it means N (no overflow)."""
        return min(_int(name, value, 0), self.n)

    def stride(self, name: str, value: object) -> int:
        """A stride in key blocks, >= 1; at or beyond nk only the diagonal's run is left, as at nk."""
        return min(_int(name, value, 1), self.nk)

    def plan(self, entries: int) -> None:
        """Place the row-level work: ``entries`` = rows x intervals per row (an upper bound).
        Raises ValueError above :data:`MAX_ROW_INTERVALS` (before anything is allocated)."""
        if entries > MAX_ROW_INTERVALS:
            raise ValueError(
                f"the pattern needs {entries} row intervals (query block rows x intervals per row), above "
                f"MAX_ROW_INTERVALS={MAX_ROW_INTERVALS}: use larger blocks, shorter windows or larger strides"
            )
        self.rows_on = row_work_device(self.device, entries)

    @functools.cached_property
    def q_first(self) -> torch.Tensor:
        """(nq,) int64 first token of each query block."""
        return torch.arange(0, self.nq * self.bq, self.bq, dtype=torch.int64, device=self.rows_on)

    @functools.cached_property
    def q_last(self) -> torch.Tensor:
        """(nq,) int64 last token of each query block (the last block may be partial)."""
        return torch.clamp(self.q_first + (self.bq - 1), max=self.n - 1)

    @functools.cached_property
    def diag(self) -> torch.Tensor:
        """(nq,) int64 key block holding each query block's first token."""
        return self.q_first // self.bk

    def layout(
        self,
        lo: torch.Tensor,
        hi: torch.Tensor,
        *,
        num_heads: int = 1,
        presorted: bool = False,
        symmetric: bool = False,
    ) -> BlockLayout:
        """CSR of the per-row interval unions; ``symmetric``: the token rule is symmetric, so with
        Bq == Bk the tile set is too and the transposed CSR the backward reads is the CSR itself."""
        layout = BlockLayout.from_intervals(
            lo,
            hi,
            block_size=(self.bq, self.bk),
            num_heads=num_heads,
            num_query_blocks=self.nq,
            num_key_blocks=self.nk,
            presorted=presorted,
            clipped=True,  # every builder's intervals lie in [0, nk) with lo <= hi
            device=self.device,
        )
        if symmetric and self.bq == self.bk:
            layout.with_transposed_csr(layout.crow_indices, layout.col_indices)
        return layout

    def window(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, 1) key-block interval of keys within ``window`` tokens of some query of the block."""
        lo = torch.clamp(self.q_first - window, min=0) // self.bk
        hi = torch.clamp(self.q_first + (self.bq - 1 + window), max=self.n - 1) // self.bk + 1  # from the last query
        return lo[:, None], hi[:, None]

    def window_span(self, window: int) -> int:
        """Upper bound (host int) on the key blocks of :meth:`window`, for sizing without a device read."""
        return min(self.nk, (self.bq - 1 + 2 * window) // self.bk + 2)

    def global_interval(self, global_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, 1): every row reads the global key blocks; global query blocks read everything
        (both start at key block 0, so their union is one interval)."""
        gk = -(-min(global_tokens, self.n) // self.bk)
        gq = -(-min(global_tokens, self.n) // self.bq)
        hi = torch.where(self.q_first < gq * self.bq, self.nk, gk)
        return torch.zeros_like(hi)[:, None], hi[:, None]

    def lattice(self, stride: int, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, K): key blocks j with (j - diag) % stride == 0 within ``reach`` tokens."""
        lo_w, hi_w = (t[:, 0] for t in self.window(reach))
        if stride == 1:
            return lo_w[:, None], hi_w[:, None]
        # the lattice points at or after lo_w, in increasing order (so rows come out sorted);
        # K comes from a host bound on the window, so no device value is read to size it
        first = lo_w + torch.remainder(self.diag - lo_w, stride)
        span = self.window_span(reach)
        m = torch.arange(0, -(-span // stride) * stride, stride, dtype=torch.int64, device=self.rows_on)
        cols = first[:, None] + m[None, :]
        inside = (cols >= lo_w[:, None]) & (cols < hi_w[:, None])
        lo = torch.where(inside, cols, 0)
        return lo, torch.where(inside, cols + 1, 0)


def local_window(
    seq_len: int, window: int, *, block_size: int | tuple[int, int] = (128, 128), device: Device = "cpu"
) -> BlockLayout:
    """Sliding window: query token i reads keys j with |i - j| <= ``window`` tokens (both sides).

    Intersect with :func:`causal` for a causal window. window 0 keeps the diagonal tiles.
    """
    g = _Grid(seq_len, block_size, device)
    w = g.distance("window", window)
    if compiled_triton_available(g.device):  # one Triton launch, no host read (kernels.pattern_build.window_csr)
        from .kernels.pattern_build import window_csr

        crow, col = window_csr(g.n, (g.bq, g.bk), w, g.device)
        layout = BlockLayout.from_valid_csr(crow, col, (g.bq, g.bk), 1, g.nq, g.nk)
        return layout.with_transposed_csr(crow, col) if g.bq == g.bk else layout  # symmetric, as below
    lo, hi = g.window(w)
    return g.layout(lo, hi, presorted=True, symmetric=True)


def causal(seq_len: int, *, block_size: int | tuple[int, int] = (128, 128), device: Device = "cpu") -> BlockLayout:
    """Lower-triangular tiles: those holding at least one key j <= query i (pass is_causal=True
    at call time to also mask inside the diagonal tiles)."""
    g = _Grid(seq_len, block_size, device)
    g.plan(max(g.nq, g.nk))
    lo = torch.zeros(g.nq, 1, dtype=torch.int64, device=g.rows_on)
    layout = g.layout(lo, (g.q_last // g.bk + 1)[:, None])
    # transposed: key block j is read by the query blocks whose last token is >= its first key
    # j * Bk, i.e. blocks [j * Bk // Bq, nq): one interval per column, no sort
    first = torch.arange(0, g.nk * g.bk, g.bk, dtype=torch.int64, device=g.rows_on) // g.bq
    ccol, rows = expand_intervals(first[:, None], (g.nq - first)[:, None], g.nk, nnz=layout.nnz, device=g.device)
    return layout.with_transposed_csr(ccol, rows)


def dilated(
    seq_len: int, stride: int, *, block_size: int | tuple[int, int] = (128, 128), device: Device = "cpu"
) -> BlockLayout:
    """Strided key blocks: query block i reads key blocks j with (j - d(i)) % stride == 0, where
    d(i) is the key block holding block i's first token (so the diagonal is always kept)."""
    g = _Grid(seq_len, block_size, device)
    s = g.stride("stride", stride)
    # row i is one strided run first_i, first_i + s, ... < nk: written straight into CSR
    first = torch.remainder(g.diag, s)
    counts = (g.nk - 1 - first) // s + 1
    crow, col = expand_intervals(first[:, None], counts[:, None], g.nq, step=s, device=g.device)
    layout = BlockLayout.from_valid_csr(crow, col, (g.bq, g.bk), 1, g.nq, g.nk)
    # (j - i) % s == 0 is symmetric when d(i) = i (Bq == Bk)
    return layout.with_transposed_csr(crow, col) if g.bq == g.bk else layout


def global_local(
    seq_len: int,
    window: int,
    global_tokens: int,
    *,
    block_size: int | tuple[int, int] = (128, 128),
    device: Device = "cpu",
) -> BlockLayout:
    """Longformer: a sliding ``window`` plus the first ``global_tokens`` tokens, which every query
    reads and which read every key."""
    g = _Grid(seq_len, block_size, device)
    lo_w, hi_w = g.window(g.distance("window", window))
    lo_g, hi_g = g.global_interval(g.distance("global_tokens", global_tokens))
    # the global interval starts at 0, before the window: starts are already in order
    return g.layout(torch.cat([lo_g, lo_w], dim=1), torch.cat([hi_g, hi_w], dim=1), presorted=True, symmetric=True)


def bigbird(
    seq_len: int,
    window: int,
    global_tokens: int,
    random_blocks: int,
    *,
    seed: int = 0,
    num_heads: int = 1,
    block_size: int | tuple[int, int] = (128, 128),
    device: Device = "cpu",
) -> BlockLayout:
    """BigBird: :func:`global_local` plus ``random_blocks`` key blocks per query block row.

    Draw t of query block q of head h is a counter-based integer hash of (seed, h, q, t)
    (:mod:`attn_sparse.hashing`; ``seed`` modulo 2**64), so a pattern is the same on any machine
    and device, with no random generator state. Draws are with replacement and may coincide with
    window/global blocks (a row then has fewer extra blocks). ``num_heads`` > 1 gives each head
    its own random blocks (a per-head layout). On CUDA with Triton installed, Triton kernels
    build the CSR and attach the transposed CSR in a few launches
    (:mod:`attn_sparse.kernels.pattern_build`); elsewhere torch ops build the same layout.
    """
    return _bigbird(seq_len, window, global_tokens, random_blocks, seed, num_heads, block_size, device)


def _bigbird(
    seq_len: int,
    window: int,
    global_tokens: int,
    random_blocks: int,
    seed: int,
    num_heads: int,
    block_size: int | tuple[int, int],
    device: Device,
    *,
    triton: bool | None = None,
) -> BlockLayout:
    """:func:`bigbird`; ``triton`` picks the builder (None: :func:`compiled_triton_available`). Tests pass
    True to run the Triton builder on CPU tensors under TRITON_INTERPRET=1."""
    g = _Grid(seq_len, block_size, device, num_heads)
    heads = g.heads
    r = _int("random_blocks", random_blocks, 0)
    g.plan(heads * g.nq * (2 + r))  # both builders materialise every row's draws
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    w, gt = g.distance("window", window), g.distance("global_tokens", global_tokens)
    key = hashing.seed_key(seed)
    if triton is None:
        triton = compiled_triton_available(g.device)
    if triton:
        from .kernels.pattern_build import bigbird_csr

        crow, col, ccol, rows = bigbird_csr(g.n, (g.bq, g.bk), w, gt, r, key, heads, g.device)
        layout = BlockLayout.from_valid_csr(crow, col, (g.bq, g.bk), heads, g.nq, g.nk)
        return layout.with_transposed_csr(ccol, rows)
    lo_w, hi_w = g.window(w)
    lo_g, hi_g = g.global_interval(gt)
    rnd = hashing.random_blocks(key, heads, g.nq, g.nk, r, g.rows_on)
    lo = torch.cat([lo_g.expand(heads, -1, -1), lo_w.expand(heads, -1, -1), rnd], dim=2)
    hi = torch.cat([hi_g.expand(heads, -1, -1), hi_w.expand(heads, -1, -1), rnd + 1], dim=2)
    # transposed_csr sorts the tiles when first asked: the random draws break the symmetry
    return g.layout(lo.reshape(heads * g.nq, -1), hi.reshape(heads * g.nq, -1), num_heads=heads)


def hierarchical(
    seq_len: int,
    windows: Sequence[int],
    strides: Sequence[int],
    *,
    block_size: int | tuple[int, int] = (128, 128),
    device: Device = "cpu",
) -> BlockLayout:
    """Fine near, coarse far: level l reads every ``strides[l]``-th key block (counted from the
    diagonal) within ``windows[l]`` tokens. E.g. windows (1024, 16384, N), strides (1, 4, 32):
    every block within 1K tokens, every 4th within 16K, every 32nd beyond."""
    g = _Grid(seq_len, block_size, device)
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise TypeError(f"windows must be a sequence of ints, got {windows!r}")
    if isinstance(strides, (str, bytes)) or not isinstance(strides, Sequence):
        raise TypeError(f"strides must be a sequence of ints, got {strides!r}")
    if len(windows) != len(strides) or not windows:
        raise ValueError(
            f"windows and strides must be non-empty and of equal length, got {list(windows)} and {list(strides)}"
        )
    levels = [(g.stride("stride", s), g.distance("window", w)) for w, s in zip(windows, strides)]
    g.plan(g.nq * sum(1 if s == 1 else -(-g.window_span(w) // s) for s, w in levels))
    los, his = [], []
    for s, w in levels:
        lo, hi = g.lattice(s, w)
        los.append(lo)
        his.append(hi)
    # windows and lattices through the diagonal are symmetric when Bq == Bk
    return g.layout(torch.cat(los, dim=1), torch.cat(his, dim=1), symmetric=True)


def _same_tiles_offset(g: _Grid, w: int, r: int, o: int) -> int:
    """An offset whose group-(w, r) tiles equal offset o's, so heads differing only in offset
    are built once. With N and the segments block-aligned: if the rate divides both block sizes,
    every block of a segment holds every offset (all offsets alike); if both block sizes divide the
    rate, a block holds an aligned chunk of min(Bq, Bk) consecutive offsets (offsets alike per chunk)."""
    if g.n % g.bq or g.n % g.bk or w % g.bq or w % g.bk:
        return o
    if g.bq % r == 0 and g.bk % r == 0:
        return 0
    if r % g.bq == 0 and r % g.bk == 0:
        chunk = min(g.bq, g.bk)
        return o - o % chunk
    return o


def _longnet_slots(g: _Grid, w: int) -> int:
    """Segments a query block can touch (of length ``w``)."""
    return g.bq // w + 2 if w < g.bq else 2


def _longnet_width(g: _Grid, w: int, r: int) -> int:
    """Intervals per row :func:`_longnet_group` gives for group (w, r)."""
    return _longnet_slots(g, w) * (1 if r <= g.bk else w // r)


def _longnet_group(g: _Grid, w: int, r: int, o: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, K) key intervals of the tiles where offset-o rows of group (w, r) meet in a segment."""
    slots = torch.arange(_longnet_slots(g, w), dtype=torch.int64, device=g.rows_on)
    seg = (g.q_first // w)[:, None] + slots[None, :]  # (nq, S) candidate segments of each block
    seg_first = seg * w
    seg_last = torch.clamp(seg_first + w, max=g.n) - 1
    # does the block hold a selected query (p % r == o) inside this segment?
    a = torch.maximum(g.q_first[:, None], seg_first)
    b = torch.minimum(g.q_last[:, None], seg_last)
    first_sel = a + torch.remainder(o - a, r)
    has_query = first_sel <= b
    # selected keys of the segment: seg_first + o + t * r <= last_sel
    k_first = seg_first + o
    last_sel = seg_last - torch.remainder(seg_last - o, r)
    has_key = (k_first <= seg_last) & has_query
    if r <= g.bk:
        # consecutive selected keys are at most one block apart: one contiguous interval
        lo = torch.where(has_key, k_first // g.bk, torch.zeros_like(seg))
        hi = torch.where(has_key, last_sel // g.bk + 1, torch.zeros_like(seg))
        return lo, hi
    t = torch.arange(w // r, dtype=torch.int64, device=g.rows_on)
    pos = k_first[:, :, None] + t * r  # (nq, S, w/r) key positions, each in its own block
    ok = has_key[:, :, None] & (pos <= seg_last[:, :, None])
    lo = torch.where(ok, pos // g.bk, torch.zeros_like(pos)).reshape(g.nq, -1)
    return lo, torch.where(ok, pos // g.bk + 1, torch.zeros_like(pos)).reshape(g.nq, -1)


def longnet(
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    head_mode: str = "all",
    per_head: bool = False,
    block_size: int | tuple[int, int] = (128, 128),
    device: Device = "cpu",
) -> BlockLayout:
    """Block form of a LongNet dilated configuration (``attn_core`` semantics).

    A tile is active when some head has, in some group g, a selected query (position % r_g ==
    head offset) in the query block and a selected key of the same segment in the key block.
    With ``per_head=False`` the layout is the union over heads (shared); ``per_head=True`` gives
    each head its own tiles. Block-sparse attention over this layout is a *superset* of the
    dilated pattern (whole tiles, every key of them, a single softmax): it is the tile set a
    dilated kernel must visit, not a re-implementation of dilated attention.
    """
    g = _Grid(seq_len, block_size, device, num_heads)
    heads = g.heads
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    for w in cfg.segment_lengths:  # segment arithmetic (segment index x length) stays far inside int64
        if w > MAX_SEQ_LEN:
            raise ValueError(f"segment lengths must be <= {MAX_SEQ_LEN} tokens, got {w} in {list(cfg.segment_lengths)}")
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {per_head!r}")
    per_head_sets: list[set[tuple[int, int, int]]] = [set() for _ in range(heads)]
    for gi, (w, r) in enumerate(zip(cfg.segment_lengths, cfg.dilation_rates)):
        for j in cfg.heads_for_group(gi, heads):
            per_head_sets[j].add((w, r, _same_tiles_offset(g, w, r, cfg.head_offset(gi, j))))

    def per_row(keys: set[tuple[int, int, int]]) -> int:
        return max(1, sum(_longnet_width(g, w, r) for w, r, _ in keys))

    if per_head:
        g.plan(heads * g.nq * max(per_row(k) for k in per_head_sets))
    else:
        g.plan(g.nq * per_row(set().union(*per_head_sets)))
    cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def group(key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in cache:
            cache[key] = _longnet_group(g, *key)
        return cache[key]

    def intervals(keys: set[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [group(key) for key in sorted(keys)]
        if not parts:
            empty = torch.zeros(g.nq, 1, dtype=torch.int64, device=g.rows_on)
            return empty, empty
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    if not per_head:
        lo, hi = intervals(set().union(*per_head_sets))
        return g.layout(lo, hi, symmetric=True)
    pairs = [intervals(s) for s in per_head_sets]
    width = max(p[0].shape[1] for p in pairs)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    lo = torch.cat([pad(p[0]) for p in pairs], dim=0)
    hi = torch.cat([pad(p[1]) for p in pairs], dim=0)
    # queries and keys are selected by one rule (position % r == offset, same segment): every
    # head's tile set is symmetric when Bq == Bk
    return g.layout(lo, hi, num_heads=heads, symmetric=True)


def _offsets(cu_seqlens: object) -> object:
    """cu_seqlens as given (validated later), a list or tuple of ints becoming an int32 tensor
    (the form a PatternLibrary recipe stores, JSON)."""
    if isinstance(cu_seqlens, torch.Tensor) or not isinstance(cu_seqlens, (list, tuple)):
        return cu_seqlens
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cu_seqlens):
        raise TypeError(f"cu_seqlens must be an int32 tensor or a list of ints, got {cu_seqlens!r:.200}")
    bad = [c for c in cu_seqlens if not 0 <= c <= MAX_SEQ_LEN]
    if bad:
        raise ValueError(f"cu_seqlens offsets must be in [0, {MAX_SEQ_LEN}], got {bad[0]} in {cu_seqlens!r:.200}")
    return torch.tensor(cu_seqlens, dtype=torch.int32)


def documents(
    cu_seqlens: torch.Tensor | Sequence[int],
    seq_len: int,
    *,
    block_size: int | tuple[int, int] = (128, 128),
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    device: Device = "cpu",
) -> BlockLayout:
    """Packed documents: the block-diagonal tiles holding a (query, key) pair of one document,
    within the causal / ``window_size=(left, right)`` band counted inside each document.

    cu_seqlens: int32 tensor (or list of ints) (num_docs + 1,), flash-attn's varlen offsets from
    0 to ``seq_len`` (empty documents allowed). The tiles are those
    :func:`attn_sparse.block_sparse_attention` derives for a call with these masks and no layout
    (:meth:`attn_sparse.masks.TokenMask.layout`: one key interval per query block, O(tiles));
    pass the same ``is_causal``, ``window_size`` and ``cu_seqlens`` at call time, which mask the
    tokens inside the tiles.
    """
    g = _Grid(seq_len, block_size, device)
    mask = TokenMask.build(
        is_causal=is_causal,
        window_size=window_size,
        cu_seqlens=_offsets(cu_seqlens),
        batch=1,
        seq_len_q=g.n,
        seq_len_k=g.n,
        device=g.device,
    )
    return mask.layout(g.n, g.n, (g.bq, g.bk), g.device)


PATTERNS: dict[str, Callable[..., BlockLayout]] = {
    "bigbird": bigbird,
    "causal": causal,
    "dilated": dilated,
    "documents": documents,
    "global_local": global_local,
    "hierarchical": hierarchical,
    "local_window": local_window,
    "longnet": longnet,
}


def build_pattern(kind: str, *, device: Device = "cpu", **params: Any) -> BlockLayout:
    """Build pattern ``kind`` (a key of :data:`PATTERNS`) with keyword ``params`` on ``device``."""
    if kind not in PATTERNS:
        raise ValueError(f"unknown pattern {kind!r}; allowed: {sorted(PATTERNS)}")
    try:
        return PATTERNS[kind](device=device, **params)
    except TypeError as exc:
        if "argument" in str(exc):  # wrong/missing keyword: name the pattern in the message
            raise TypeError(f"pattern {kind!r}: {exc}") from exc
        raise
