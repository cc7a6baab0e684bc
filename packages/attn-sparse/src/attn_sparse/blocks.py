"""Block-sparse attention of a query shard over one key range, with LSE: the primitive ring attention builds on.

:func:`block_forward` attends queries to the active tiles of ``layout`` over one range of keys and
returns (out, lse). :func:`block_backward` takes the rows' *final* out and lse (merged over every
key range, e.g. with :func:`attn_core.merge.merge_into_`) and returns this range's contribution
to (dq, dk, dv). With the merged statistics the rows' probabilities are exp(s - L_merged) and
delta = rowsum(dout * out_merged), so the contributions of all ranges add up exactly to the
gradient of the merged output (dq summed over ranges; dk, dv of each range's own keys).
(:mod:`attn_core.blocks` is the same pair for dense blocks.)

Shapes: q (B, Nq, H, D); k, v (B, Nk, Hkv, D) with H % Hkv == 0 (query head j reads kv head
j // (H // Hkv)); one float dtype and device. ``layout``: a :class:`BlockLayout` of
ceil(Nq/Bq) x ceil(Nk/Bk) blocks (1 or H heads) over this query shard and key range, positions
counted from the first query and the first key of the range. ``is_causal`` masks key j for
query i when j > i in those local positions (top-left aligned): a range whose keys all precede
the shard's queries takes ``is_causal=False``. ``key_intervals``: a
:class:`attn_sparse.intervals.KeyIntervals` (Nq queries, at most Nk keys) masking each query to
its own interval of the range's keys, e.g. windows and documents of the whole sequence mapped to
this call's keys (:meth:`KeyIntervals.for_shard`); with ``is_causal`` both masks apply. They
mask inside the active tiles, as the token masks of :func:`attn_sparse.block_sparse_attention`
do. lse: (B, H, Nq), natural log, in
``attn_core.blocks.acc_dtype(q.dtype)`` (float32; float64 for float64 inputs); ``-inf`` for rows
that see no key in the range (their out is 0).

Backends (:data:`BLOCK_BACKENDS`): "triton" runs attn_sparse's Triton kernels (CUDA fp16/bf16 on
compute capability >= 8.0, or CPU tensors under TRITON_INTERPRET=1; head dims 16..128), "reference"
the gathered PyTorch path over the active tiles (any device and float dtype; backward by autograd
through it). ``backend="auto"`` takes triton where it can run, else the reference;
:func:`block_backend` says which and why; a pinned backend that cannot take the call raises
ValueError with its reasons (never a silent fallback). The choice depends only on q's device,
dtype and head dim and the layout's block size, so one choice serves every key range of a call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attn_core.blocks import acc_dtype
from attn_core.registry import BackendChoice, BackendRegistry
from attn_core.validation import check_bool, check_qkv, resolve_softmax_scale

from .backends.reference import gathered_attention
from .intervals import KeyIntervals
from .layout import BlockLayout
from .masks import TokenMask

if TYPE_CHECKING:
    from .kernels import KernelMask

__all__ = ["BLOCK_BACKENDS", "block_backend", "block_backward", "block_forward"]

BLOCK_BACKENDS: tuple[str, ...] = ("triton", "reference")
REGISTRY = BackendRegistry("attn_sparse", BLOCK_BACKENDS)
REGISTRY.load_all()


def block_backend(
    q: torch.Tensor, layout: BlockLayout, *, is_causal: bool = False, backend: str = "auto"
) -> BackendChoice:
    """The backend :func:`block_forward` / :func:`block_backward` run for queries like ``q`` (B, Nq, H, D)
    over tiles of ``layout``'s block size, and why every other backend was not taken (runs nothing).

    ``layout`` may be any layout of the call's block size (e.g. the global one of a sharded call):
    only its block size is read. Raises ValueError for a pinned backend that cannot take the call.
    """
    check_qkv(q, q, q, same_length=False)
    _check_layout(layout)
    return _choose(q, layout, check_bool("is_causal", is_causal), backend, explain_all=True)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    is_causal: bool = False,
    key_intervals: KeyIntervals | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q's dtype, lse (B, H, Nq) in acc_dtype) of q over the active tiles of this key range.

    No autograd history: gradients come from :func:`block_backward`. ``softmax_scale`` defaults to
    1/sqrt(D). See the module docstring for shapes, the layout and the backends.
    """
    layout, causal, intervals, scale = _validate(q, k, v, layout, is_causal, key_intervals, softmax_scale)
    choice = _choose(q, layout, causal, backend)
    if q.shape[0] == 0:  # an empty batch: nothing to launch (the kernels take no empty grid)
        B, Nq, H, _ = q.shape
        return torch.zeros_like(q), torch.full((B, H, Nq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    if choice.backend == "triton":
        from .kernels import CSR, block_sparse_forward, default_config
        from .kernels.launch import device_guard

        kmask = _kernel_mask(causal, intervals, q.shape[1], k.shape[1])
        cfg = default_config(layout.block_size, head_dim=q.shape[-1], banded=kmask.banded)
        with device_guard(q.device):
            return block_sparse_forward(q, k, v, CSR.from_layout(layout), kmask, scale, cfg)
    with torch.no_grad():
        return gathered_attention(q, k, v, layout, mask=_token_mask(causal, intervals), softmax_scale=scale)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockLayout,
    *,
    is_causal: bool = False,
    key_intervals: KeyIntervals | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This key range's (dq (B, Nq, H, D), dk, dv (B, Nk, Hkv, D)) in acc_dtype(q.dtype), from the rows' final statistics.

    dout, out: (B, Nq, H, D), any float dtype: the gradient of the merged output and the merged
    output itself (over every key range); lse: (B, H, Nq) the merged LSE (-inf for rows that see
    no key anywhere: zero gradients). dk, dv are summed over each kv head's query heads. Other
    arguments as in :func:`block_forward`, with the same backend choice.
    """
    layout, causal, intervals, scale = _validate(q, k, v, layout, is_causal, key_intervals, softmax_scale)
    _check_statistics(dout, out, lse, q)
    ad = acc_dtype(q.dtype)
    choice = _choose(q, layout, causal, backend)
    if q.shape[0] == 0:  # an empty batch: no gradient to compute
        dq, dk, dv = (torch.zeros(t.shape, dtype=ad, device=q.device) for t in (q, k, v))
        return dq, dk, dv
    if choice.backend == "triton":
        from .kernels import CSR, block_sparse_backward, default_config
        from .kernels.launch import device_guard

        kmask = _kernel_mask(causal, intervals, q.shape[1], k.shape[1])
        # the tiles (and backward form) block_sparse_attention takes for the same masks
        cfg = default_config(layout.block_size, head_dim=q.shape[-1], banded=kmask.banded)
        with device_guard(q.device):
            grads = block_sparse_backward(
                dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype), lse.to(torch.float32).contiguous(),
                CSR.from_layout(layout), kmask, scale, cfg,
            )  # fmt: skip
        return grads[0].to(ad), grads[1].to(ad), grads[2].to(ad)
    return _reference_backward(dout, q, k, v, out, lse, layout, _token_mask(causal, intervals), scale)


def _token_mask(causal: bool, intervals: KeyIntervals | None) -> TokenMask | KeyIntervals:
    """The masks inside the tiles as the reference path reads them (intervals: causal folded in)."""
    return TokenMask.causal_only(causal) if intervals is None else intervals


def _kernel_mask(causal: bool, intervals: KeyIntervals | None, seq_len_q: int, seq_len_k: int) -> KernelMask:
    """The masks inside the tiles as the kernels read them: explicit intervals (causal folded in)
    as per-row bounds at query rows and, seen from the keys, at key rows; unbounded sides."""
    from .kernels import KernelMask

    if intervals is None:
        return KernelMask.causal(causal, seq_len_q, seq_len_k)
    far = seq_len_q + seq_len_k
    return KernelMask(True, far, far, intervals.bounds, intervals.query_bounds(seq_len_k))


def _reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask | KeyIntervals,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Autograd through this range's partial (out_s, lse_s), driven by the gradient of the merged
    output out = sum_s w_s out_s, w_s = exp(lse_s - L): d out_s = w_s dout and
    d lse_s = w_s <dout, out_s - out>, which gives dS = exp(s - L) (dP - rowsum(dout * out))."""
    ad = acc_dtype(q.dtype)
    dout_a, out_a, lse_a = dout.to(ad), out.to(ad), lse.to(ad)
    finite = torch.where(torch.isfinite(lse_a), lse_a, torch.zeros_like(lse_a))
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        o_s, l_s = gathered_attention(qd, kd, vd, layout, mask=mask, softmax_scale=scale)
        w = torch.exp(l_s.to(ad) - finite)  # (B, H, Nq); 0 where this range saw no key
        g_out = w.transpose(1, 2).unsqueeze(-1) * dout_a
        g_lse = w * (dout_a * (o_s.to(ad) - out_a)).sum(-1).transpose(1, 2)
        dq, dk, dv = torch.autograd.grad((o_s, l_s), (qd, kd, vd), (g_out.to(o_s.dtype), g_lse.to(l_s.dtype)))
    return dq.to(ad), dk.to(ad), dv.to(ad)


def _check_layout(layout: object) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be an attn_sparse.BlockLayout, got {type(layout).__name__}")


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    is_causal: bool,
    key_intervals: KeyIntervals | None,
    softmax_scale: float | None,
) -> tuple[BlockLayout, bool, KeyIntervals | None, float]:
    """(layout on q's device, causal, the key intervals on q's device with causal folded in, scale)."""
    _, Nq, H, _, D = check_qkv(q, k, v, same_length=False)
    _check_layout(layout)
    layout.check_fits(Nq, k.shape[1], H)
    causal = check_bool("is_causal", is_causal)
    intervals = None
    if key_intervals is not None:
        if not isinstance(key_intervals, KeyIntervals):
            raise TypeError(
                f"key_intervals must be an attn_sparse.intervals.KeyIntervals or None, got {type(key_intervals).__name__}"
            )
        key_intervals.check_fits(Nq, k.shape[1])
        intervals = key_intervals.to(q.device)
        if causal:
            intervals = intervals.with_causal()
    return layout.to(q.device), causal, intervals, resolve_softmax_scale(softmax_scale, D)


def _check_statistics(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> None:
    """dout and out shaped like q, lse (B, H, Nq): floating tensors on q's device."""
    B, Nq, H, _ = q.shape
    for name, t, shape in (("dout", dout, tuple(q.shape)), ("out", out, tuple(q.shape)), ("lse", lse, (B, H, Nq))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from q {tuple(q.shape)}), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _choose(
    q: torch.Tensor, layout: BlockLayout, is_causal: bool, backend: str, *, explain_all: bool = False
) -> BackendChoice:
    # the backends' reasons read q's device, dtype and head dim and the block size (k, v share q's)
    return REGISTRY.choose(
        backend,
        lambda mod: mod.unsupported_reasons(q, q, q, layout, TokenMask.causal_only(is_causal)),
        explain_all=explain_all,
    )
