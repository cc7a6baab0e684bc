"""Attention over packed variable-length sequences with its LSE, and its backward from given (merged) statistics.

Layout (flash-attn's varlen convention): sequences packed along the first dim,

    q: (total_q, H, D)    k, v: (total_k, Hkv, D), H % Hkv == 0 (query head i reads kv head i // (H // Hkv))
    cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,); sequence i is rows [c[i], c[i+1]) of each

Query rows of sequence i attend the key rows of sequence i only. ``is_causal``: row t of a sequence
sees its keys 0..t (needs equal query and key lengths per sequence, where top-left and bottom-right
alignment agree). ``key_padding_mask``: (total_k,) bool, True = a key no query sees. Rows that see
no key give out 0 and lse -inf.

* :func:`varlen_forward` -> (out (total_q, H, D) in q's dtype, lse (H, total_q) fp32, fp64 for fp64).
* :func:`varlen_backward` takes the rows' *final* out and lse (merged with other calls over the
  same rows: dilation levels, ring steps) and returns this call's (dq, dk, dv) in q's dtype; the
  sum over the calls is then exactly the gradient of the merged output (the contract of
  :mod:`attn_core.blocks`, with the packed layout and an (H, total) LSE).

Implementations (:mod:`attn_core.varlen_impls`), chosen per call like the block primitives:
``"flash"`` (CUDA fp16/bf16, torch's flash-attention varlen kernels, native GQA, no copies) and
``"bucketed"`` (every device and dtype: sequences batched by power-of-two length buckets into
padded batches through :mod:`attn_core.blocks`). :func:`explain_varlen` says which runs and why.

Offsets are checked on the host (one small read per call) unless ``check_offsets=False``, for
callers that built them (the sdpa backend's packed planner): wrong offsets there are not detected.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .blocks import acc_dtype
from .registry import BackendChoice, BackendRegistry, ReasonsOf
from .validation import check_bool, check_qkv, check_tensor, resolve_softmax_scale

__all__ = ["VARLEN_IMPLS", "explain_varlen", "varlen_backward", "varlen_forward"]

# Best first; "bucketed" takes every call. Loaded on first use.
VARLEN_IMPLS = BackendRegistry("attn_core", ("flash", "bucketed"), subpackage="varlen_impls")


def _reasons_of(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, has_padding: bool
) -> ReasonsOf:
    return lambda mod: mod.unsupported_reasons(q, k, cu_seqlens_q, max_seqlen_q, has_padding)


def _impl(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, has_padding: bool
) -> ModuleType:
    choice = VARLEN_IMPLS.choose("auto", _reasons_of(q, k, cu_seqlens_q, max_seqlen_q, has_padding))
    mod = VARLEN_IMPLS.load(choice.backend)
    if mod is None:  # choose only picks an installed implementation
        raise RuntimeError(f"varlen implementation {choice.backend!r} was chosen but cannot be imported")
    return mod


def _check_offsets_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    check_offsets: bool,
) -> None:
    """Shapes, dtypes and devices (no host read); with ``check_offsets`` also the offsets' values (one read)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dims (total, heads, D) (packed sequences), got shape {tuple(t.shape)}"
            )
    mask = key_padding_mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
        if mask.dim() != 1:
            raise ValueError(f"key_padding_mask must be (total_k,) = ({k.shape[0]},), got {tuple(mask.shape)}")
    # the batched checks (dtypes, devices, heads, D) on a batch of one
    check_qkv(q[None], k[None], v[None], key_padding_mask=None if mask is None else mask[None], same_length=False)
    for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of dtype torch.int32, got {type(c).__name__}")
        if c.dtype != torch.int32 or c.dim() != 1 or c.numel() == 0:
            raise ValueError(f"{name} must be int32 of shape (num_seqs + 1,), got {c.dtype} {tuple(c.shape)}")
        if c.device != q.device and c.device.type != "cpu":
            raise ValueError(f"{name} must be on {q.device} like q, or on the CPU, got {c.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    max_q = _check_offsets_int("max_seqlen_q", max_seqlen_q)
    max_k = _check_offsets_int("max_seqlen_k", max_seqlen_k)
    check_bool("is_causal", is_causal)
    check_bool("check_offsets", check_offsets)
    if check_offsets:
        _check_offset_values(q.shape[0], k.shape[0], cu_seqlens_q, cu_seqlens_k, max_q, max_k, is_causal)


def _check_offset_values(
    total_q: int,
    total_k: int,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
) -> None:
    cq = cu_seqlens_q.to(torch.int64)
    ck = cu_seqlens_k.to(cq.device, torch.int64)
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    if lq.numel() == 0:
        stats = [*torch.stack([cq[0], cq[-1], ck[0], ck[-1]]).tolist(), 0, 0, 0, 0, 0]
    else:  # one host read for every check
        stats = torch.stack(
            [cq[0], cq[-1], ck[0], ck[-1], lq.min(), lq.max(), lk.min(), lk.max(), (lq - lk).abs().max()]
        ).tolist()
    q0, q_end, k0, k_end, q_min, q_max, k_min, k_max, unequal = stats
    for name, first, end, total, low, high, bound in (
        ("cu_seqlens_q", q0, q_end, total_q, q_min, q_max, max_q),
        ("cu_seqlens_k", k0, k_end, total_k, k_min, k_max, max_k),
    ):
        if first != 0 or end != total:
            raise ValueError(
                f"{name} must run from 0 to the packed length {total}, got {name}[0] = {first}, [-1] = {end}"
            )
        if low < 0:
            raise ValueError(f"{name} must be non-decreasing, got a sequence of length {low}")
        if high > bound:
            raise ValueError(f"max_seqlen {bound} is below the longest sequence of {name} ({high})")
    if is_causal and unequal:
        raise ValueError(
            "is_causal needs equal query and key lengths in every sequence (cu_seqlens_q == cu_seqlens_k), "
            f"got lengths that differ by up to {unequal}"
        )


def explain_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> BackendChoice:
    """Which implementation :func:`varlen_forward` / :func:`varlen_backward` run for these inputs, and
    why; every other implementation's reasons are in ``rejected``. Runs nothing, reads no offsets."""
    _check_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, is_causal, False
    )  # fmt: skip
    reasons_of = _reasons_of(q, k, cu_seqlens_q, max_seqlen_q, key_padding_mask is not None)
    return VARLEN_IMPLS.choose("auto", reasons_of, explain_all=True)


def varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    check_offsets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, D) in q's dtype, lse (H, total_q) fp32, fp64 for fp64 q); see the module docstring.

    q (total_q, H, D); k, v (total_k, Hkv, D); cu_seqlens_q/k int32 (num_seqs + 1,) on q's device
    (or the CPU: the bucketed path then reads no device memory); max_seqlen_q/k at least the longest
    sequence. softmax_scale None: D ** -0.5. Rows that see no key: out 0, lse -inf.
    """
    _check_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, is_causal, check_offsets
    )  # fmt: skip
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = _impl(q, k, cu_seqlens_q, max_seqlen_q, key_padding_mask is not None)
    return impl.forward(  # type: ignore[no-any-return]
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, key_padding_mask
    )


def varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    check_offsets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This call's (dq (total_q, H, D), dk, dv (total_k, Hkv, D)), in q's dtype, given the rows' final
    ``out`` (total_q, H, D) and ``lse`` (H, total_q) (after every merge). dk, dv are summed over the
    query heads sharing a kv head; padded keys get 0; rows whose lse is -inf contribute nothing."""
    _check_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, is_causal, check_offsets
    )  # fmt: skip
    check_tensor("dout", dout, tuple(q.shape), q.device)
    check_tensor("out", out, tuple(q.shape), q.device)
    check_tensor("lse", lse, (q.shape[1], q.shape[0]), q.device)
    if dout.dtype != q.dtype or out.dtype != q.dtype:
        raise TypeError(f"dout and out must have q's dtype {q.dtype}, got {dout.dtype} and {out.dtype}")
    if lse.dtype not in (torch.float32, acc_dtype(q.dtype)):
        raise TypeError(f"lse must be float32 (float64 for float64 q), got {lse.dtype}")
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    impl = _impl(q, k, cu_seqlens_q, max_seqlen_q, key_padding_mask is not None)
    return impl.backward(  # type: ignore[no-any-return]
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
        key_padding_mask,
    )  # fmt: skip
