"""Ring block-sparse attention: attn_sparse's block-sparse attention over a sequence sharded across ranks.

Needs the optional attn-sparse package (``pip install attn-ring[sparse]``); importing this module
without it raises ImportError naming the extra.

Each rank of ``group`` (W ranks) holds a contiguous shard of n = N / W tokens (rank b: positions
[b*n, (b+1)*n)), with n a multiple of both block sizes so shards own whole query and key
blocks. ``layout`` is the *global* :class:`attn_sparse.BlockLayout` (ceil(N/Bq) x ceil(N/Bk)
blocks), identical on every rank (checked), or None: the tiles are then derived from the token
masks on the global sequence (:meth:`attn_sparse.masks.TokenMask.layout`, tiles of
:func:`derived_block_size`), the same on every rank.

Token masks (``is_causal``, ``window_size``, ``cu_seqlens``) are those of the whole sequence
(:class:`attn_sparse.masks.TokenMask`, global positions). A given layout is first intersected
with the tiles the masks can use, so every planned tile holds a key some of its queries see.
Inside a step, a causal-only mask is the local step's ``is_causal`` (earlier ranks' keys are all
visible); windows and documents reach the steps as :class:`attn_sparse.intervals.KeyIntervals`:
each of this rank's queries' global key interval mapped to the positions of the step's keys.

Schedule: the local step (this rank's queries against its own keys) runs first; then ring step
s = 1..W-1 receives from rank (b - s) mod W and sends to (b + s) mod W, double buffered (step
s + 1 is posted before step s is computed). A rank sends a peer only the key blocks that have
an active tile in some row of the peer's query blocks (any head), so a step whose K/V block has
no active tile for the receiver's queries moves nothing at all, and partially needed blocks move
only their active key blocks. Causal: keys of later ranks are never needed. Partial results
merge by LSE in fp32.

Every step runs attn_sparse's per-key-range primitive (:mod:`attn_sparse.blocks`): the forward
gives the step's (out_s, lse_s), and the backward takes the merged out and LSE and returns the
step's exact share of the gradient of the merged output, so the shares add up to it. One backend
(attn_sparse's Triton kernels where they run, else its reference path; see
:func:`attn_sparse.block_backend`) serves every step of a call. Gradients of received K/V blocks
are returned to their owners in one batched exchange.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from attn_core.blocks import acc_dtype
from attn_core.first_order import first_order_only, second_order_error
from attn_core.merge import merge_into_
from attn_core.validation import check_bool, check_qkv, check_window_size, resolve_softmax_scale

try:
    from attn_sparse import BlockLayout, block_backend, block_backward, block_forward
    from attn_sparse.api import DERIVED_BLOCK_SIZE
    from attn_sparse.intervals import KeyIntervals
    from attn_sparse.layout import MIN_BLOCK_SIZE
    from attn_sparse.masks import TokenMask
except ModuleNotFoundError as exc:  # the optional extra is absent: say which one
    raise ImportError("attn_ring.ring_sparse needs the attn-sparse package: pip install 'attn-ring[sparse]'") from exc

from .comm import DEFAULT_TIMEOUT_S, PendingTransfer, RingComm, check_timeout, config_hash, dtype_code
from .exchange import comm_device
from .ulysses import packed_documents_code

__all__ = ["RingSparsePlan", "derived_block_size", "plan_ring_sparse", "ring_block_sparse_attention"]


@dataclass(frozen=True)
class RingSparsePlan:
    """Which key blocks travel between which ranks, and each rank's per-step sub-layouts.

    blocks[(a, b)]: sorted local key-block indices of rank a that rank b needs (absent: nothing).
    """

    seq_len: int
    world_size: int
    block_size: tuple[int, int]
    is_causal: bool
    blocks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def shard_len(self) -> int:
        return self.seq_len // self.world_size

    def ring_steps(self, rank: int) -> list[tuple[int, int, int]]:
        """(step, source, destination) of the W - 1 ring steps of ``rank``."""
        W = self.world_size
        return [(s, (rank - s) % W, (rank + s) % W) for s in range(1, W)]

    def skipped_steps(self, rank: int) -> int:
        """Ring steps in which ``rank`` receives nothing (no active tile needs the source's keys)."""
        return sum((src, rank) not in self.blocks for _, src, _ in self.ring_steps(rank))

    def bytes_received(self, rank: int, *, batch: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
        """Forward K/V payload bytes ``rank`` receives: key blocks x Bk x 2 (K and V) x B x Hkv x D x size."""
        blocks = sum(int(t.numel()) for (a, b), t in self.blocks.items() if b == rank)
        return blocks * self.block_size[1] * 2 * batch * num_kv_heads * head_dim * element_size


def _tile_coords(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head, query block, key block) int64 of every active tile, in CSR order."""
    crow = layout.crow_indices.long().cpu()
    col = layout.col_indices.long().cpu()
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow[1:] - crow[:-1])
    return rows // layout.num_query_blocks, rows % layout.num_query_blocks, col


def plan_ring_sparse(layout: BlockLayout, seq_len: int, world_size: int, *, is_causal: bool = False) -> RingSparsePlan:
    """The exchange plan: for every (source, receiver) pair, the source's key blocks the receiver needs.

    Raises ValueError unless the layout covers ``seq_len`` tokens and the shard length
    seq_len / world_size is a multiple of both block sizes.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be an attn_sparse.BlockLayout, got {type(layout).__name__}")
    for name, val in (("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    causal = check_bool("is_causal", is_causal)
    bq, bk = layout.block_size
    if seq_len % world_size != 0:
        raise ValueError(f"sequence length {seq_len} must be divisible by the world size {world_size}")
    n = seq_len // world_size
    if n % bq != 0 or n % bk != 0:
        raise ValueError(
            f"shard length {n} (= {seq_len} / {world_size}) must be a multiple of the block sizes {layout.block_size} "
            "so every rank owns whole query and key blocks"
        )
    layout.check_fits(seq_len, seq_len, layout.num_heads)
    _, qi, col = _tile_coords(layout)
    q_rank, k_rank = qi // (n // bq), col // (n // bk)
    keep = q_rank != k_rank
    if causal:
        keep &= k_rank < q_rank  # later ranks' keys are all after this rank's queries
    nk = layout.num_key_blocks
    # the union over heads and query rows: one key block travels once per receiver
    pairs = torch.unique(q_rank[keep] * nk + col[keep])
    recv_rank, blocks = pairs // nk, pairs % nk
    src_rank = blocks // (n // bk)
    plan: dict[tuple[int, int], torch.Tensor] = {}
    for a in range(world_size):
        for b in range(world_size):
            sel = (src_rank == a) & (recv_rank == b)
            if bool(sel.any()):
                plan[(a, b)] = blocks[sel] - a * (n // bk)
    return RingSparsePlan(seq_len, world_size, (bq, bk), causal, plan)


def _sub_layout(layout: BlockLayout, q_blocks: range, key_blocks: torch.Tensor) -> BlockLayout | None:
    """The tiles of query blocks ``q_blocks`` against global key blocks ``key_blocks`` (sorted), re-indexed
    to (len(q_blocks), len(key_blocks)); None if no tile is active there."""
    head, qi, col = _tile_coords(layout)
    nql = len(q_blocks)
    pos = torch.searchsorted(key_blocks, col).clamp(max=max(key_blocks.numel() - 1, 0))
    sel = (qi >= q_blocks.start) & (qi < q_blocks.stop) & (key_blocks[pos] == col)
    if not bool(sel.any()):
        return None
    rows = head[sel] * nql + (qi[sel] - q_blocks.start)
    crow = torch.zeros(layout.num_heads * nql + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=layout.num_heads * nql), 0, out=crow[1:])
    return BlockLayout.from_csr(
        crow,
        pos[sel],
        block_size=layout.block_size,
        num_key_blocks=int(key_blocks.numel()),
        num_heads=layout.num_heads,
    )


@dataclass
class _Step:
    source: int  # rank whose keys this step uses
    layout: BlockLayout  # this rank's query blocks x the received key blocks
    causal: bool
    intervals: KeyIntervals | None  # windows/documents: each query's keys among the step's (causal folded in)


@dataclass
class _Call:
    rank: int
    world: int
    comm: RingComm
    plan: RingSparsePlan
    local: _Step | None
    remote: dict[int, _Step]  # source rank -> step
    scale: float
    backend: str  # the attn_sparse.blocks backend of every step ("triton" or "reference")


def _triton_available(q: torch.Tensor, layout: BlockLayout, causal: bool) -> bool:
    """attn_sparse's Triton kernels run the steps of a call with these queries and layout
    (CUDA fp16/bf16; CPU under TRITON_INTERPRET=1)."""
    return block_backend(q, layout, is_causal=causal).backend == "triton"


def _step_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: _Step, call: _Call
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's (out (B, n, H, D) in q's dtype, lse (B, H, n)) over the step's tiles."""
    return block_forward(
        q,
        k,
        v,
        step.layout,
        is_causal=step.causal,
        key_intervals=step.intervals,
        softmax_scale=call.scale,
        backend=call.backend,
    )


def _post_step(k: torch.Tensor, v: torch.Tensor, call: _Call, step: int) -> tuple[PendingTransfer, list[int]]:
    """Post ring step ``step``: send our needed key blocks forward, receive the ones we need from behind.
    Returns the transfer and the source ranks of what it receives (none or the step's source)."""
    B, n, Hkv, D = k.shape
    bk = call.plan.block_size[1]
    src, dst = (call.rank - step) % call.world, (call.rank + step) % call.world
    dev = comm_device(call.comm.group, k.device)
    sends, recvs = {}, {}
    mine = call.plan.blocks.get((call.rank, dst))
    if mine is not None:
        idx = mine.to(k.device)
        kb, vb = k.reshape(B, n // bk, bk, Hkv, D), v.reshape(B, n // bk, bk, Hkv, D)
        sends[dst] = torch.stack([kb.index_select(1, idx), vb.index_select(1, idx)]).to(dev).contiguous()
    theirs = call.plan.blocks.get((src, call.rank))
    if theirs is not None:
        recvs[src] = torch.empty(2, B, theirs.numel(), bk, Hkv, D, dtype=k.dtype, device=dev)
    what = f"rank {call.rank}: ring block-sparse step {step}"
    return call.comm.exchange(sends, recvs, what), sorted(recvs)


class _RingSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _Call) -> torch.Tensor:  # type: ignore[override]
        B, n, H, D = q.shape
        Hkv = k.shape[2]
        ad = acc_dtype(q.dtype)
        out = torch.zeros(B, n, H, D, dtype=ad, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=ad, device=q.device)
        pending = _post_step(k, v, call, 1) if call.world > 1 else None
        if call.local is not None:
            o, l = _step_forward(q, k, v, call.local, call)
            merge_into_(out, lse, o, l)
        received: dict[int, torch.Tensor] = {}
        for step in range(1, call.world):
            if pending is None:  # unreachable: posted before the loop and at the end of every step but the last
                raise RuntimeError(f"rank {call.rank}: ring block-sparse step {step} was never posted")
            transfer, sources = pending
            bufs = transfer.wait()
            if step + 1 < call.world:  # double buffering: the next block travels while this one is computed
                pending = _post_step(k, v, call, step + 1)
            for src, buf in zip(sources, bufs):
                kv = buf.to(q.device).reshape(2, B, -1, Hkv, D)
                received[src] = kv
                o, l = _step_forward(q, kv[0], kv[1], call.remote[src], call)
                merge_into_(out, lse, o, l)
        ctx.call = call
        ctx.sources = sorted(received)
        ctx.save_for_backward(q, k, v, out, lse, *[received[s] for s in ctx.sources])
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, *_ = ctx.saved_tensors
        with torch.no_grad():  # the kernels and the exchange have no derivative of their own
            grads = _RingSparseFunction.first_order_grads(ctx, dout)
        return (*first_order_only(grads, (dout, q, k, v), SECOND_ORDER_ERROR), None)

    @staticmethod
    def first_order_grads(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) in the inputs' dtypes; dK/dV of received blocks go back to their owners."""
        q, k, v, out, lse, *recv = ctx.saved_tensors
        call: _Call = ctx.call
        B, n, H, D = q.shape
        ad = acc_dtype(q.dtype)

        def step_grads(
            kk: torch.Tensor, vv: torch.Tensor, step: _Step
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # the step's share of the gradient of the merged output (from the merged out and lse)
            return block_backward(
                dout, q, kk, vv, out, lse, step.layout, is_causal=step.causal, key_intervals=step.intervals,
                softmax_scale=call.scale, backend=call.backend,
            )  # fmt: skip

        dq = torch.zeros(B, n, H, D, dtype=ad, device=q.device)
        dk = torch.zeros(k.shape, dtype=ad, device=q.device)
        dv = torch.zeros_like(dk)
        if call.local is not None:
            a, b_, c = step_grads(k, v, call.local)
            dq += a
            dk += b_
            dv += c
        sends: dict[int, torch.Tensor] = {}
        dev = comm_device(call.comm.group, q.device)
        for src, kv in zip(ctx.sources, recv):
            a, dk_r, dv_r = step_grads(kv[0], kv[1], call.remote[src])
            dq += a
            sends[src] = torch.stack([dk_r, dv_r]).to(dev).contiguous()
        if call.world > 1:
            Hkv = k.shape[2]
            bk = call.plan.block_size[1]
            recvs = {}
            for dst in range(call.world):
                blocks = call.plan.blocks.get((call.rank, dst))
                if blocks is not None and dst != call.rank:
                    recvs[dst] = torch.empty(2, B, blocks.numel() * bk, Hkv, D, dtype=ad, device=dev)
            call.comm.exchange(sends, recvs, f"rank {call.rank}: ring block-sparse dK/dV return").wait()
            dkb, dvb = dk.view(B, n // bk, bk, Hkv, D), dv.view(B, n // bk, bk, Hkv, D)
            for dst, buf in recvs.items():
                idx = call.plan.blocks[(call.rank, dst)].to(q.device)
                g = buf.to(q.device).reshape(2, B, -1, bk, Hkv, D)
                dkb.index_add_(1, idx, g[0])
                dvb.index_add_(1, idx, g[1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


SECOND_ORDER_ERROR = second_order_error(
    "ring block-sparse attention",
    "use attn_sparse.block_sparse_attention(backend='reference') on the gathered sequence",
)


def derived_block_size(shard_len: int) -> tuple[int, int]:
    """The tile (Bq, Bk) of a ``layout=None`` call with shards of ``shard_len`` tokens.

    attn_sparse's :data:`~attn_sparse.api.DERIVED_BLOCK_SIZE` (the kernels' production tile) where
    it divides the shard, else per side the largest power of two >= MIN_BLOCK_SIZE that does (every
    rank must own whole blocks; the result does not depend on the tile, the masks are token-exact).
    ValueError when no such tile exists (shard_len not a multiple of MIN_BLOCK_SIZE).
    """
    if isinstance(shard_len, bool) or not isinstance(shard_len, int) or shard_len <= 0:
        raise ValueError(f"shard_len must be a positive int, got {shard_len!r}")
    sides = []
    for side in DERIVED_BLOCK_SIZE:
        b = side
        while b >= MIN_BLOCK_SIZE and shard_len % b != 0:
            b //= 2
        if b < MIN_BLOCK_SIZE:
            raise ValueError(
                f"layout=None derives tiles of at least {MIN_BLOCK_SIZE} tokens that every rank owns whole: "
                f"the shard length {shard_len} must be a multiple of {MIN_BLOCK_SIZE} (or pass a BlockLayout)"
            )
        sides.append(b)
    return sides[0], sides[1]


def _layout_checksum(layout: BlockLayout) -> int:
    """A position-weighted checksum of the CSR arrays, so ranks with different layouts are told apart."""
    crow, col = layout.crow_indices.long().cpu(), layout.col_indices.long().cpu()
    weighted = [int((t * (torch.arange(t.numel()) % 65521 + 1)).sum()) for t in (crow, col)]
    return config_hash((layout.shape, layout.block_size, *weighted))


def ring_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> torch.Tensor:
    """Block-sparse attention over a sequence sharded contiguously across the ranks of ``group``.

    Every rank passes its shard q (B, n, H, D), k and v (B, n, Hkv, D) (H % Hkv == 0) and the same
    global ``layout`` (ceil(N/Bq) x ceil(N/Bk) blocks for N = n * W, 1 or H heads), with n a
    multiple of both block sizes; or ``layout=None`` (needs a token mask): the tiles are derived
    from the token masks on the global sequence (tiles of :func:`derived_block_size`, so n must be
    a multiple of 16). Returns this rank's shard (B, n, H, D) of
    ``attn_sparse.block_sparse_attention(..., is_causal=, window_size=, cu_seqlens=)`` on the
    gathered sequence, with exact gradients.

    Token masks, in global positions: ``is_causal`` masks keys after the query (top-left
    aligned); ``window_size=(left, right)``: query i sees keys i - left <= j <= i + right
    (flash-attn's convention, -1 = unbounded on that side); ``cu_seqlens``: int32
    (num_docs + 1,) offsets of documents packed along the *whole* sequence (B == 1; the same on
    every rank, on q's device or the CPU): queries see keys of their own document only, which
    may cross shard boundaries. They intersect the layout.

    Only key blocks with an active tile for a receiver's queries (and a key those queries see)
    are sent; a peer that never answers gives TimeoutError after ``timeout_s`` seconds; ranks
    with different shapes/layouts/options (window and documents included) raise ValueError on
    every rank.
    """
    check_qkv(q, k, v)
    B, n, H, D = q.shape
    if n == 0:
        raise ValueError("each rank's shard must hold at least one token, got q with sequence length 0")
    if layout is not None and not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be an attn_sparse.BlockLayout or None, got {type(layout).__name__}")
    causal = check_bool("is_causal", is_causal)
    window = (-1, -1) if window_size is None else check_window_size(window_size)
    documents = packed_documents_code(cu_seqlens)  # one host read of the offsets; checked after the handshake
    scale = resolve_softmax_scale(softmax_scale, D)
    timeout_s = check_timeout(timeout_s)
    comm = RingComm(group, timeout_s=timeout_s)
    rank, world = comm.rank, comm.world_size
    N = n * world
    # a derived layout is a function of (n, the masks), all in the handshake: -1 stands for it
    layout_code = -1 if layout is None else _layout_checksum(layout)
    block_code = (0, 0) if layout is None else layout.block_size
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    descriptor = {
        "batch": B,
        "shard_len": n,
        "num_heads": H,
        "num_kv_heads": k.shape[2],
        "head_dim": D,
        "dtype": dtype_code(q.dtype),
        "is_causal": int(causal),
        "window_left": window[0],
        "window_right": window[1],
        "cu_seqlens": documents,
        "Bq": block_code[0],
        "Bk": block_code[1],
        "layout": layout_code,
        "softmax_scale": scale_bits,
    }
    comm.handshake(descriptor, "ring block-sparse attention")
    # after the handshake every rank holds the same values, so an error below is raised on every rank
    mask = TokenMask.build(
        is_causal=causal, window_size=window, cu_seqlens=cu_seqlens, batch=B, seq_len_q=N, seq_len_k=N, device=q.device
    )
    if layout is None:
        if not mask.banded:
            raise ValueError(
                "layout=None derives the tiles from the token masks, but none was given "
                "(pass a BlockLayout, or is_causal=True, window_size or cu_seqlens)"
            )
        layout = mask.layout(N, N, derived_block_size(n), q.device)
    else:
        layout.check_fits(N, N, H)
        if mask.banded:  # only tiles holding a key some of their queries see: nothing else travels
            layout = layout & mask.layout(N, N, layout.block_size, layout.device)
    plan = plan_ring_sparse(layout, N, world, is_causal=causal)
    bq, bk = layout.block_size
    q_blocks = range(rank * n // bq, (rank + 1) * n // bq)
    own = torch.arange(rank * n // bk, (rank + 1) * n // bk)
    # windows and documents mask inside the steps through each query's global key interval,
    # computed once for this rank's rows (a causal-only mask is the local step's is_causal)
    rows = None
    if mask.window is not None or mask.cu_seqlens is not None:
        lo, hi = mask.key_intervals(N, N, q.device)
        rows = (lo[rank * n : (rank + 1) * n], hi[rank * n : (rank + 1) * n])

    def step(source: int, key_blocks: torch.Tensor, sub: BlockLayout) -> _Step:
        """The step over global key blocks ``key_blocks`` (sorted, as they sit in its K/V buffer)."""
        if rows is None:
            return _Step(source, sub, causal and source == rank, None)
        positions = (key_blocks.to(q.device)[:, None] * bk + torch.arange(bk, device=q.device)).flatten()
        return _Step(source, sub, False, KeyIntervals.from_global(rows[0], rows[1], positions))

    local_layout = _sub_layout(layout, q_blocks, own)
    local = None if local_layout is None else step(rank, own, local_layout)
    remote = {}
    for a in range(world):
        blocks = plan.blocks.get((a, rank))
        if blocks is not None:
            sub = _sub_layout(layout, q_blocks, blocks + a * (n // bk))
            if sub is None:  # unreachable: the plan only lists blocks with an active tile here
                raise RuntimeError(f"rank {rank}: planned blocks from rank {a} have no active tile")
            remote[a] = step(a, blocks + a * (n // bk), sub)
    call = _Call(
        rank,
        world,
        comm,
        plan,
        local,
        remote,
        scale,
        block_backend(q, layout, is_causal=causal).backend,
    )
    result: torch.Tensor = _RingSparseFunction.apply(q, k, v, call)
    return result
