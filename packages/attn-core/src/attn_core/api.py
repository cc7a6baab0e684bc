"""Public functional API: validate, build a :class:`DilatedCall`, pick a backend, dispatch.

Backends live in ``attn_core.backends.<name>`` and are imported lazily (they never import each
other). Each module defines ``NAME``, ``unsupported_reasons(call) -> list[str]`` (empty: it can
take the call) and ``dilated_attention(call) -> out (B, N, H, D)``. ``backend="auto"`` tries
:data:`AUTO_ORDER` and takes the first that accepts the call; :func:`explain` reports that choice
and why every other backend was not taken; :func:`last_backend` names the backend the latest
call in this thread ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .config import DilatedCall, DilatedConfig
from .registry import BackendChoice, BackendRegistry
from .validation import check_bool, check_cu_seqlens, check_dropout, check_qkv, resolve_softmax_scale

__all__ = ["AUTO_ORDER", "BACKENDS", "BackendChoice", "dilated_attention", "explain", "last_backend"]

# Preference order of "auto": the fused SDPA path first, the pure PyTorch path always last.
REGISTRY = BackendRegistry("attn_core", ("sdpa", "reference"))
REGISTRY.load_all()  # torch.compile cannot import: a first call inside it needs them loaded
AUTO_ORDER: tuple[str, ...] = REGISTRY.order
BACKENDS: tuple[str, ...] = REGISTRY.order


def _make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float | None,
    dropout_p: float,
    head_mode: str,
    cu_seqlens: torch.Tensor | None,
) -> DilatedCall:
    B, N, _, _, D = check_qkv(q, k, v, key_padding_mask=key_padding_mask)
    config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch=B, seq_len=N, device=q.device)
    return DilatedCall(
        q=q,
        k=k,
        v=v,
        config=config,
        is_causal=check_bool("is_causal", is_causal),
        key_padding_mask=key_padding_mask,
        softmax_scale=resolve_softmax_scale(softmax_scale, D),
        dropout_p=check_dropout(dropout_p),
        cu_seqlens=cu_seqlens,
    )


def _choose(call: DilatedCall, backend: str, *, explain_all: bool = False) -> BackendChoice:
    return REGISTRY.choose(backend, lambda mod: mod.unsupported_reasons(call), explain_all=explain_all)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    head_mode: str = "all",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> BackendChoice:
    """The backend :func:`dilated_attention` would run with these arguments, and why (runs nothing);
    ``execution`` says how the sdpa backend runs the call (packed, gathered or strided executor)."""
    call = _make_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        head_mode=head_mode,
        cu_seqlens=cu_seqlens,
    )
    choice = _choose(call, backend, explain_all=True)
    executor = getattr(REGISTRY.load(choice.backend), "executor", None)
    if executor is None:
        return choice
    name, why = executor(call)
    return dataclasses.replace(choice, execution=f"{name} ({why})")


def last_backend() -> str | None:
    """Name of the backend the most recent :func:`dilated_attention` call in this thread ran."""
    return REGISTRY.last()


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    head_mode: str = "all",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LongNet dilated attention, differentiable with exact gradients.

    q: (B, N, H, D); k, v: (B, N, Hkv, D) with H % Hkv == 0; key_padding_mask: (B, N) bool,
    True = padding. segment_lengths w_g and dilation_rates r_g with w_g % r_g == 0; N need not
    be a multiple of any w_g. head_mode "all" (every head runs every group) or "split" (heads
    partitioned into contiguous groups). Returns out (B, N, H, D) in q's dtype; a (position, head)
    selected by no group or seeing only padding gives 0. Padded keys' k and v values are never read
    into the result (NaN or inf there changes nothing; their gradients are 0). Segment lengths and
    rates larger than N select what N-sized ones do, at the cost of N-sized ones.

    backend: "auto" or one of :data:`BACKENDS`; a pinned backend that cannot take the input
    raises ValueError with its reasons (no fallback). See :func:`explain`, :func:`last_backend`.
    """
    call = _make_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        head_mode=head_mode,
        cu_seqlens=cu_seqlens,
    )
    choice = _choose(call, backend)
    mod = REGISTRY.load(choice.backend)
    if mod is None:  # choose only picks installed backends
        raise RuntimeError(f"backend {choice.backend!r} disappeared after selection")
    REGISTRY.record(choice.backend)
    return mod.dilated_attention(call)
