"""Ulysses attention: sequence-sharded in and out, head-parallel inside, through two all-to-alls.

Every rank of a group of W ranks holds a contiguous shard of the sequence (rank r: tokens
[r*n, (r+1)*n), n = N / W) of q (B, n, H, D) and k, v (B, n, Hkv, D). One all-to-all
(:class:`attn_ring.alltoall.AllToAllComm`) turns the shards into head shards: rank r gets the
whole sequence for its H / W query heads, global heads [r*H/W, (r+1)*H/W), and the kv heads
they read. The single-device attention runs on that (dense, LongNet dilated or block-sparse),
and a second all-to-all returns the output to sequence shards (B, n, H, D).

Gradients are exact: the all-to-all is its own adjoint (block s of rank d goes back to block d
of rank s), so its autograd backward is the same exchange on the gradients, and the inner
attention brings its own exact backward.

- dense: ``attn_core.dilated_attention`` with one segment of the whole sequence at rate 1,
  which is dense attention (causal, padding, GQA, fused SDPA kernels on GPU, exact gradients).
- dilated: ``attn_core.dilated_attention`` with the offsets of the *global* heads (head j uses
  offset j mod r_g, and head_mode="split" partitions the global heads): see
  :class:`attn_ring.head_range.HeadRangeConfig`.
- block_sparse: ``attn_sparse.block_sparse_attention`` with the layout's rows of this rank's heads
  (a shared layout is used as is; no layout: tiles derived from the token masks).

Token masks: after the exchange every rank holds whole sequences, so packed documents
(``cu_seqlens`` of the whole sequence, every kind) and windows (``window_size``, block_sparse)
reach the inner attention unchanged.

GQA: when Hkv is a multiple of W each rank receives Hkv / W kv heads. Otherwise (Hkv < W, or
not a multiple) every kv head is repeated ``kv_heads_on_wire(H, Hkv, W) / Hkv`` times before the
exchange (Hkv' = lcm(Hkv, W) heads, which divides H), so each rank receives exactly the kv heads
its query heads read: the kv send buffer and each rank's received kv are Hkv' / Hkv times larger
than without repetition (at most W / gcd(Hkv, W)); their gradients are summed back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from attn_core import dilated_attention
from attn_core.api import REGISTRY as DILATED_BACKENDS
from attn_core.config import DilatedCall, DilatedConfig
from attn_core.validation import (
    check_bool,
    check_cu_seqlens,
    check_qkv,
    check_window_size,
    cu_seqlens_on_host,
    resolve_softmax_scale,
)

from .alltoall import AllToAllComm
from .comm import check_timeout, config_hash, dtype_code
from .exchange import DEFAULT_TIMEOUT_S
from .head_range import head_range_config

__all__ = [
    "ATTENTION_KINDS",
    "heads_to_sequence",
    "kv_heads_on_wire",
    "sequence_to_heads",
    "ulysses_attention",
    "ulysses_with",
]

ATTENTION_KINDS = ("dense", "dilated", "block_sparse")


def kv_heads_on_wire(num_heads: int, num_kv_heads: int, world_size: int) -> int:
    """Kv heads sent through the all-to-all: Hkv when W divides it, else lcm(Hkv, W) (kv heads repeated)."""
    if num_kv_heads % world_size == 0:
        return num_kv_heads
    wire = num_kv_heads * world_size // math.gcd(num_kv_heads, world_size)
    if num_heads % wire:  # cannot happen when H % W == 0 and H % Hkv == 0; guarded for direct callers
        raise ValueError(f"H={num_heads} is not a multiple of lcm(Hkv={num_kv_heads}, W={world_size}) = {wire}")
    return wire


class _AllToAllFunction(torch.autograd.Function):
    """Differentiable all-to-all of a (W, ...) tensor: the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx: Any, send: torch.Tensor, comm: AllToAllComm, label: str) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.label, ctx.device = comm, label, send.device
        return comm.all_to_all(send.to(comm.device), label=label).wait().to(send.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        comm: AllToAllComm = ctx.comm
        wire = grad.to(comm.device).contiguous()
        back = comm.all_to_all(wire, label=f"{ctx.label} backward").wait().to(ctx.device)
        return back, None, None


def all_to_all(send: torch.Tensor, comm: AllToAllComm, label: str) -> torch.Tensor:
    """Differentiable ``comm.all_to_all(send).wait()`` (send (W, ...) on any device; result on send's device)."""
    out: torch.Tensor = _AllToAllFunction.apply(send, comm, label)
    return out


def sequence_to_heads(tensors: Sequence[torch.Tensor], comm: AllToAllComm, *, chunks: int = 1) -> list[torch.Tensor]:
    """Sequence shards -> head shards, all tensors in one all-to-all.

    tensors: each (B, n, Hx, D) with Hx % W == 0 (one dtype); returns each (B, W*n, Hx/W, D) on
    this rank: heads [r*Hx/W, (r+1)*Hx/W) of the tokens of every rank, in rank order. chunks: the
    shard is ``chunks`` equal pieces of n (zigzag: 2), and the result is piece 0 of every rank,
    then piece 1 of every rank, ... (contiguous: 1).
    """
    W = comm.world_size
    B, n, _, D = tensors[0].shape
    per = [t.shape[2] // W for t in tensors]
    # (W, B, n, Hx/W, D) views per tensor, concatenated along heads: one copy builds the contiguous
    # send buffer, block d holding destination d's heads of q, k and v
    send = torch.cat([t.reshape(B, n, W, h, D).permute(2, 0, 1, 3, 4) for t, h in zip(tensors, per)], dim=3)
    recv = all_to_all(send, comm, "sequence->heads")  # (W src, B, n, c, D)
    m = n // chunks
    full = recv.reshape(W, B, chunks, m, -1, D).permute(1, 2, 0, 3, 4, 5).reshape(B, chunks * W * m, -1, D)
    return [x.contiguous() for x in torch.split(full, per, dim=2)]


def heads_to_sequence(out: torch.Tensor, comm: AllToAllComm, *, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads` for one tensor: (B, W*n, h, D) -> (B, n, W*h, D)."""
    W = comm.world_size
    B, N, h, D = out.shape
    n = N // W
    m = n // chunks
    send = out.reshape(B, chunks, W, m, h, D).permute(2, 0, 1, 3, 4, 5)  # (W dst, B, chunks, m, h, D)
    recv = all_to_all(send, comm, "heads->sequence")  # (W src = head group, B, chunks, m, h, D)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(B, n, W * h, D)


def repeat_kv_heads(k: torch.Tensor, v: torch.Tensor, wire_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat every kv head wire_heads / Hkv times (adjacent copies), keeping GQA's head j -> kv j // (H/Hkv)."""
    rep = wire_heads // k.shape[2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def gather_padding_mask(mask: torch.Tensor | None, comm: AllToAllComm, *, chunks: int = 1) -> torch.Tensor | None:
    """Every rank's (B, n) key padding mask -> the (B, W*n) mask in :func:`sequence_to_heads` token order."""
    if mask is None:
        return None
    stacked = comm.all_gather(mask.to(torch.uint8), label="key padding mask")  # (W, B, n)
    W, B, n = stacked.shape
    m = n // chunks
    full = stacked.reshape(W, B, chunks, m).permute(1, 2, 0, 3).reshape(B, chunks * W * m)
    return full.to(device=mask.device, dtype=torch.bool)


def packed_documents_code(cu_seqlens: object) -> int:
    """A hash of cu_seqlens (dtype, shape, values) for the handshake; -1 for None. The values come
    from :func:`attn_core.validation.cu_seqlens_on_host`: a tensor on a GPU is read once while it is
    alive and unmodified, so the layers and steps that pass it again wait for the device nowhere.

    Its checks against the sequence (:meth:`InnerAttention.check_token_masks`) run after the
    handshake, when every rank holds the same offsets and so raises the same error.
    """
    if cu_seqlens is None:
        return -1
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens must be a torch.Tensor of dtype torch.int32 (num_docs + 1,), got {type(cu_seqlens).__name__}"
        )
    return config_hash((str(cu_seqlens.dtype), tuple(cu_seqlens.shape), cu_seqlens_on_host(cu_seqlens).tolist()))


def check_attention_kind(attention: object) -> str:
    if not isinstance(attention, str) or attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    return attention


def check_heads_split(num_heads: int, world_size: int, what: str = "group") -> None:
    if num_heads % world_size:
        raise ValueError(
            f"head-parallel attention needs the number of query heads H={num_heads} to be a multiple of the "
            f"{what} size W={world_size} (each rank takes H/W heads)"
        )


def _layout_slice(layout: Any, head_base: int, heads: int) -> Any:
    """The rows of heads [head_base, head_base + heads) of a per-head BlockLayout (a shared one as is)."""
    if layout.num_heads == 1:
        return layout
    nq = layout.num_query_blocks
    crow = layout.crow_indices.long()
    lo, hi = int(crow[head_base * nq]), int(crow[(head_base + heads) * nq])
    return type(layout).from_csr(
        crow[head_base * nq : (head_base + heads) * nq + 1] - lo,
        layout.col_indices[lo:hi],
        block_size=layout.block_size,
        num_key_blocks=layout.num_key_blocks,
        num_heads=heads,
    )


def _dilated_with_config(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: DilatedConfig,
    *,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float,
    cu_seqlens: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    if type(config) is DilatedConfig:
        return dilated_attention(
            q,
            k,
            v,
            config.segment_lengths,
            config.dilation_rates,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=softmax_scale,
            head_mode=config.head_mode,
            cu_seqlens=cu_seqlens,
            backend=backend,
        )
    if torch.compiler.is_compiling():
        # attn_core's compiled path rebuilds a plain DilatedConfig from the tuples (global offsets lost)
        raise ValueError(
            "ulysses dilated attention whose rank heads do not start at a multiple of every dilation rate "
            "cannot run under torch.compile; compile the rest of the model around it"
        )
    # The dispatch of attn_core.dilated_attention, with the head-range config (validated by the caller).
    call = DilatedCall(
        q=q,
        k=k,
        v=v,
        config=config,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        dropout_p=0.0,
        cu_seqlens=cu_seqlens,
    )
    choice = DILATED_BACKENDS.choose(backend, lambda mod: mod.unsupported_reasons(call))
    mod = DILATED_BACKENDS.load(choice.backend)
    if mod is None:
        raise RuntimeError(f"backend {choice.backend!r} disappeared after selection")
    DILATED_BACKENDS.record(choice.backend)
    out: torch.Tensor = mod.dilated_attention(call)
    return out


@dataclass(frozen=True)
class InnerAttention:
    """A validated choice of single-device attention for the head-sharded tensors."""

    kind: str
    config: DilatedConfig | None = None  # dilated
    layout: Any = None  # block_sparse: attn_sparse.BlockLayout, or None (tiles from the token masks)
    backend: str = "auto"
    # block_sparse: this rank's rows of a per-head layout, by (head_base, heads); a module keeps them
    # across calls, so attn_sparse's per-layout caches (device copy, transposed CSR) stay warm
    _slices: dict[tuple[int, int], Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def signature(self) -> int:
        """A hash of everything every rank must agree on (for the handshake)."""
        cfg: Any = ()
        if self.config is not None:
            cfg = (self.config.segment_lengths, self.config.dilation_rates, self.config.head_mode)
        elif self.layout is not None:
            lay = self.layout
            cfg = (lay.block_size, lay.num_heads, lay.num_query_blocks, lay.num_key_blocks, lay.nnz)
        return config_hash((self.kind, cfg, self.backend))

    def layout_rows(self, head_base: int, heads: int) -> Any:
        """The layout of heads [head_base, head_base + heads) (a shared layout, or None, as is)."""
        if self.layout is None:
            return None
        key = (head_base, heads)
        if key not in self._slices:
            self._slices[key] = _layout_slice(self.layout, head_base, heads)
        return self._slices[key]

    def check_token_masks(
        self,
        *,
        is_causal: bool,
        window_size: tuple[int, int] | None,
        cu_seqlens: torch.Tensor | None,
        batch: int,
        seq_len: int,
        device: torch.device,
    ) -> None:
        """ValueError for token masks this kind cannot apply to a sequence of ``seq_len`` (global) tokens.

        cu_seqlens: every kind (validated: int32, B == 1, ending at seq_len). window_size:
        block_sparse only. block_sparse with no layout needs at least one token mask.
        """
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, batch=batch, seq_len=seq_len, device=device)
        if window_size is not None and self.kind != "block_sparse":
            raise ValueError(
                f"window_size is supported with attention='block_sparse' only (attn_sparse's token windows); "
                f"attention={self.kind!r} takes no window_size"
            )
        masked = is_causal or window_size is not None or cu_seqlens is not None
        if self.kind == "block_sparse" and self.layout is None and not masked:
            raise ValueError(
                "attention='block_sparse' with layout=None derives the tiles from the token masks, but none was "
                "given (pass a layout, is_causal=True, window_size or cu_seqlens)"
            )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        head_base: int,
        total_heads: int,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        softmax_scale: float,
        cu_seqlens: torch.Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """q (B, N, h, D), k/v (B, N, hkv, D): the global heads [head_base, head_base + h) over the whole
        sequence; cu_seqlens and window_size as checked by :meth:`check_token_masks`."""
        N, h = q.shape[1], q.shape[2]
        kw: dict[str, Any] = dict(
            is_causal=is_causal, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens
        )
        if self.kind == "block_sparse":
            from attn_sparse import block_sparse_attention

            local = self.layout_rows(head_base, h)
            out: torch.Tensor = block_sparse_attention(
                q, k, v, local, window_size=window_size, backend=self.backend, **kw
            )
            return out
        if window_size is not None:
            raise ValueError(
                f"window_size is supported with attention='block_sparse' only, got attention={self.kind!r}"
            )
        if self.config is None:
            # one segment of the whole sequence at rate 1 selects every key: dense attention; with
            # cu_seqlens each document is one segment (none is longer than N): dense per document
            config = DilatedConfig((N,), (1,))
        else:
            config = head_range_config(self.config, head_base, h, total_heads)
        return _dilated_with_config(q, k, v, config, backend=self.backend, **kw)


def inner_attention(
    attention: str,
    *,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    head_mode: str,
    layout: Any,
    backend: str,
) -> InnerAttention:
    """Validate the inner attention's options: each kind takes exactly its own."""
    kind = check_attention_kind(attention)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    dilated_opts = segment_lengths is not None or dilation_rates is not None or head_mode != "all"
    if kind != "dilated" and dilated_opts:
        raise ValueError(
            f"segment_lengths, dilation_rates and head_mode belong to attention='dilated', got attention={kind!r}"
        )
    if kind != "block_sparse" and layout is not None:
        raise ValueError(f"layout (a BlockLayout) belongs to attention='block_sparse', got attention={kind!r}")
    if kind == "dilated":
        if segment_lengths is None or dilation_rates is None:
            raise ValueError("attention='dilated' needs segment_lengths and dilation_rates")
        return InnerAttention(kind, config=DilatedConfig(segment_lengths, dilation_rates, head_mode), backend=backend)
    if kind == "block_sparse":
        try:
            from attn_sparse import BlockLayout
        except ImportError as exc:
            raise ImportError("attention='block_sparse' needs attn-sparse: pip install 'attn-ring[sparse]'") from exc
        if layout is not None and not isinstance(layout, BlockLayout):
            raise TypeError(
                f"attention='block_sparse' needs layout=attn_sparse.BlockLayout or None (tiles from the token "
                f"masks), got {type(layout).__name__}"
            )
        return InnerAttention(kind, layout=layout, backend=backend)
    return InnerAttention(kind, backend=backend)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    attention: str = "dense",
    is_causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_mode: str = "all",
    layout: Any = None,
    backend: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    method: str = "auto",
) -> torch.Tensor:
    """Attention over a sequence sharded across ``group``, computed head-parallel; returns this rank's shard.

    q: (B, n, H, D), k, v: (B, n, Hkv, D): this rank's contiguous shard (rank r of W holds tokens
    [r*n, (r+1)*n) of N = n*W). H must be a multiple of W. key_padding_mask: (B, n) bool, this
    rank's shard (True = padding). Returns (B, n, H, D): this rank's shard of the attention over
    the whole sequence, with exact gradients for q, k and v.

    attention: "dense"; "dilated" (segment_lengths, dilation_rates, head_mode "all" | "split":
    equal to attn_core.dilated_attention on the gathered sequence); "block_sparse" (layout: an
    attn_sparse.BlockLayout for the whole sequence, 1 or H heads, or None: tiles derived from the
    token masks, at least one needed). backend: the inner
    attention's backend ("auto" or one of attn_core's / attn_sparse's). method: how the
    all-to-all moves bytes ("auto", "collective", "p2p"; see :mod:`attn_ring.alltoall`).

    Token masks (after the exchange every rank holds whole sequences, so they apply unchanged):
    cu_seqlens: int32 (num_docs + 1,) offsets of documents packed along the *whole* sequence
    (B == 1, ending at N = n*W; the same tensor on every rank, checked), documents may cross shard
    boundaries; every kind takes it (dense: attention within each document; dilated: each
    document alone, segments from its start, as attn_core.dilated_attention). window_size=(left,
    right) (flash-attn's convention, -1 = unbounded): attention="block_sparse" only (ValueError
    otherwise, unless (-1, -1): no window).

    Every rank must call with the same shapes, dtype and options: a mismatch raises ValueError
    on every rank; a peer that exits or never calls gives a TimeoutError/RuntimeError within
    ``timeout_s`` (gloo; NCCL: the process group's timeout).
    """
    inner = inner_attention(
        attention,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        head_mode=head_mode,
        layout=layout,
        backend=backend,
    )
    return ulysses_with(
        inner,
        q,
        k,
        v,
        group=group,
        is_causal=is_causal,
        softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask,
        cu_seqlens=cu_seqlens,
        window_size=window_size,
        timeout_s=timeout_s,
        method=method,
    )


def ulysses_with(
    inner: InnerAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    method: str = "auto",
) -> torch.Tensor:
    """:func:`ulysses_attention` with an inner attention validated once (:func:`inner_attention`; modules keep one)."""
    B, n, H, Hkv, D = check_qkv(q, k, v, key_padding_mask=key_padding_mask)
    causal = check_bool("is_causal", is_causal)
    scale = resolve_softmax_scale(softmax_scale, D)
    window = None if window_size is None else check_window_size(window_size)
    if window == (-1, -1):
        window = None  # unbounded on both sides: no mask (every kind takes it)
    documents = packed_documents_code(cu_seqlens)
    comm = AllToAllComm(group, timeout_s=check_timeout(timeout_s), method=method)
    W = comm.world_size
    if comm.backend == "nccl" and q.device.type != "cuda":
        raise ValueError(f"an NCCL group needs CUDA tensors, got q on {q.device}")
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    comm.handshake(
        {
            "batch": B,
            "shard_len": n,
            "heads": H,
            "kv_heads": Hkv,
            "head_dim": D,
            "dtype": dtype_code(q.dtype),
            "is_causal": int(causal),
            "softmax_scale": config_hash(float(scale).hex()),
            "attention": inner.signature(),
            "key_padding_mask": int(key_padding_mask is not None),
            "cu_seqlens": documents,
            "window_size": config_hash(window),
            "needs_grad": int(wants_grad),
        }
    )
    # after the handshake every rank has the same H, N, options and cu_seqlens, so every rank
    # raises the same error here
    check_heads_split(H, W)
    inner.check_token_masks(
        is_causal=causal, window_size=window, cu_seqlens=cu_seqlens, batch=B, seq_len=n * W, device=q.device
    )
    if inner.layout is not None:
        inner.layout.check_fits(n * W, n * W, H)
    wire_kv = kv_heads_on_wire(H, Hkv, W)
    k_w, v_w = repeat_kv_heads(k, v, wire_kv)
    mask = gather_padding_mask(key_padding_mask, comm)
    qh, kh, vh = sequence_to_heads([q, k_w, v_w], comm)
    h = H // W
    out_h = inner(
        qh,
        kh,
        vh,
        head_base=comm.rank * h,
        total_heads=H,
        is_causal=causal,
        key_padding_mask=mask,
        softmax_scale=scale,
        cu_seqlens=cu_seqlens,
        window_size=window,
    )
    return heads_to_sequence(out_h, comm)
