"""Public functional API: validate, pick a backend, dispatch.

Backends live in ``attn_sparse.backends.<name>`` (contract in that package's docstring) and are
imported lazily; they never import each other. ``backend="auto"`` tries :data:`AUTO_ORDER`
(sdpa: causal masks and long causal windows as dense causal calls; then triton, flex and the
pure PyTorch reference) and takes the first that accepts the call;
:func:`explain` reports the choice and why every other backend was not taken; a pinned backend
that cannot take the call raises ValueError with its reasons (never falls back).
"""

from __future__ import annotations

from types import ModuleType

import torch

from attn_core.registry import BackendChoice, BackendRegistry
from attn_core.validation import check_qkv, resolve_softmax_scale

from .layout import BlockLayout
from .masks import TokenMask

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DERIVED_BLOCK_SIZE",
    "BackendChoice",
    "block_sparse_attention",
    "explain",
    "last_backend",
]

REGISTRY = BackendRegistry("attn_sparse", ("sdpa", "triton", "flex", "reference"))
REGISTRY.load_all()  # torch.compile cannot import: a first call inside it needs them loaded
AUTO_ORDER: tuple[str, ...] = REGISTRY.order
BACKENDS: tuple[str, ...] = REGISTRY.order
# Block size of the layouts derived from token masks (layout=None): the kernels' production tile.
DERIVED_BLOCK_SIZE = (128, 128)


def _reasons(
    mod: ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    padded: bool,
) -> list[str]:
    reasons = list(mod.unsupported_reasons(q, k, v, layout, mask))
    if padded and not getattr(mod, "SUPPORTS_KEY_PADDING_MASK", False):
        reasons.append("no key_padding_mask support")
    return reasons


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    is_causal: bool,
    window_size: tuple[int, int] | None,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float | None,
    key_padding_mask: torch.Tensor | None,
) -> tuple[BlockLayout, TokenMask, float]:
    B, Nq, H, _, D = check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    if q.device.type == "meta":  # the tiles are data: nothing can be computed without values
        raise ValueError("q, k, v are on the meta device; block_sparse_attention needs tensors with values")
    mask = TokenMask.build(
        is_causal=is_causal,
        window_size=window_size,
        cu_seqlens=cu_seqlens,
        batch=B,
        seq_len_q=Nq,
        seq_len_k=k.shape[1],
        device=q.device,
    )
    if layout is None:
        if not mask.banded:
            raise ValueError(
                "layout=None derives the tiles from the token masks, but none was given "
                "(pass a BlockLayout, or is_causal=True, window_size or cu_seqlens)"
            )
        layout = mask.layout(Nq, k.shape[1], DERIVED_BLOCK_SIZE, q.device)
    elif not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be an attn_sparse.BlockLayout or None, got {type(layout).__name__}")
    layout.check_fits(Nq, k.shape[1], H)
    return layout.to(q.device), mask, resolve_softmax_scale(softmax_scale, D)


def _choose(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    padded: bool,
    backend: str,
    *,
    explain_all: bool = False,
) -> BackendChoice:
    return REGISTRY.choose(backend, lambda mod: _reasons(mod, q, k, v, layout, mask, padded), explain_all=explain_all)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None = None,
    *,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> BackendChoice:
    """The backend :func:`block_sparse_attention` would run with these arguments, and why (runs nothing)."""
    layout, mask, _ = _validate(q, k, v, layout, is_causal, window_size, cu_seqlens, softmax_scale, key_padding_mask)
    return _choose(q, k, v, layout, mask, key_padding_mask is not None, backend, explain_all=True)


def last_backend() -> str | None:
    """Name of the backend the most recent :func:`block_sparse_attention` call in this thread ran."""
    return REGISTRY.last()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None = None,
    *,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over the active tiles of ``layout`` and the token masks, with exact gradients.

    q: (B, Nq, H, D); k, v: (B, Nk, Hkv, D) with H % Hkv == 0 (GQA); one float dtype and device.
    layout: a :class:`BlockLayout` with ceil(Nq/Bq) x ceil(Nk/Bk) blocks and 1 or H heads
    (moved to q's device, cached), or None: the tiles are then derived from the token masks
    (:data:`DERIVED_BLOCK_SIZE` blocks, cached; needs at least one mask).

    Token masks (they intersect the layout; see :mod:`attn_sparse.masks`):
    ``is_causal``: query i sees keys j <= i (top-left aligned, like SDPA).
    ``window_size=(left, right)``: i - left <= j <= i + right (flash-attn's convention, -1 =
    unbounded on that side). ``cu_seqlens``: int32 (num_docs + 1,) offsets of documents packed
    along N (B == 1, Nq == Nk; flash-attn's varlen convention): queries see keys of their own
    document only. key_padding_mask: (B, Nk) bool, True = padding key to ignore (only backends
    that declare support take it). A query that sees no key gets 0.
    Returns (B, Nq, H, D).

    backend: "auto" or one of :data:`BACKENDS`; see :func:`explain` and :func:`last_backend`.
    """
    layout, mask, scale = _validate(
        q, k, v, layout, is_causal, window_size, cu_seqlens, softmax_scale, key_padding_mask
    )
    choice = _choose(q, k, v, layout, mask, key_padding_mask is not None, backend)
    mod = REGISTRY.load(choice.backend)
    if mod is None:  # choose only picks installed backends
        raise RuntimeError(f"backend {choice.backend!r} disappeared after selection")
    REGISTRY.record(choice.backend)
    if key_padding_mask is None:
        out: torch.Tensor = mod.block_sparse_attention(q, k, v, layout, mask, scale)
    else:
        out = mod.block_sparse_attention(q, k, v, layout, mask, scale, key_padding_mask=key_padding_mask)
    return out
