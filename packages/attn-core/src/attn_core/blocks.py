"""Attention block primitives with LSE: the per-step kernels ring attention and dilated groups use.

``block_forward`` returns (out, lse) for one block of queries against one block of keys.
``block_backward`` takes the *final* out and lse of the rows (after merging with other blocks)
and returns this block's contribution to dq, dk, dv. Using the merged statistics makes the sum
of the per-block gradients exactly the gradient of the merged output (the rows' probabilities
are exp(s - L_merged), and D = rowsum(dout * out_merged)).

Shapes: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) with H % Hkv == 0 (any strides); out like q;
lse (B, H, Nq) fp32 (fp64 for fp64 q): the LSE layout of every public attn_core primitive.
``is_causal`` is top-left aligned (query i sees keys j <= i).

The implementations live in :mod:`attn_core.block_impls` (the cuDNN path on CUDA, the portable
math path everywhere), chosen per call through :data:`BLOCK_IMPLS`, the same explainable
registry the backends use: :func:`explain_block` says which one runs and why the others do not.
The numerics every implementation and backend share are here too: :func:`acc_dtype`,
:func:`softmax_with_lse`, :func:`drop_padded_keys`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .registry import BackendChoice, BackendRegistry, ReasonsOf
from .validation import check_qkv, check_tensor

__all__ = [
    "BLOCK_IMPLS",
    "acc_dtype",
    "block_backward",
    "block_forward",
    "drop_padded_keys",
    "explain_block",
    "softmax_with_lse",
]


# The implementations, best first; the math path takes every block. Loaded on first use (no import
# of the kernels' modules until a block runs).
BLOCK_IMPLS = BackendRegistry("attn_core", ("cudnn", "math"), subpackage="block_impls")


def _reasons_of(q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> ReasonsOf:
    return lambda mod: mod.unsupported_reasons(q, k, is_causal, has_padding)


def _impl(q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> ModuleType:
    choice = BLOCK_IMPLS.choose("auto", _reasons_of(q, k, is_causal, has_padding))
    mod = BLOCK_IMPLS.load(choice.backend)
    if mod is None:  # choose only picks an installed implementation
        raise RuntimeError(f"block implementation {choice.backend!r} was chosen but cannot be imported")
    return mod


def explain_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> BackendChoice:
    """Which block implementation :func:`block_forward` / :func:`block_backward` run for these inputs,
    and why; every other implementation's reasons are in ``rejected``. Runs nothing."""
    check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    reasons_of = _reasons_of(q, k, is_causal, key_padding_mask is not None)
    return BLOCK_IMPLS.choose("auto", reasons_of, explain_all=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (reference path), everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax p of logits s (..., n) (-inf = masked) and its log-sum-exp lse (...), differentiable.

    The row max is subtracted before exp and p is divided by its own sum, so p sums to 1 however
    large the logits (exp(s - logsumexp(s)) does not: at |s| ~ 1e6 in fp32 the rounding of the
    lse alone scales every p by up to e^0.03). Rows with no finite logit: p 0, lse -inf, no NaN.
    """
    if s.shape[-1] == 0:  # no keys: every row is empty
        return s, torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    # any reference point gives the same p and lse: the max keeps exp in range (no gradient needed)
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))  # no 0/0, even in the branch not taken
    lse = torch.where(nonempty, row_max + torch.log(safe), torch.full_like(total, float("-inf")))
    return e / safe, lse.squeeze(-1)


def drop_padded_keys(
    k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Nk, Hkv, D) with the rows of padded keys (key_padding_mask (B, Nk) True) set to 0.

    Padded keys are masked out of the softmax, but a masked logit still multiplies their values
    (q . k, p * v): a NaN or inf there would reach the output (NaN + -inf, 0 * NaN). Zeroing them
    makes their values never read; the gradient of k and v is 0 there.
    """
    keep = ~key_padding_mask[:, :, None, None]
    return torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) fp32, fp64 for fp64 q); empty rows: out 0, lse -inf.

    Padded keys (key_padding_mask (B, Nk) True) are ignored, their k and v values never read.
    """
    check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    impl = _impl(q, k, is_causal, key_padding_mask is not None)
    return impl.forward(q, k, v, is_causal, softmax_scale, key_padding_mask)  # type: ignore[no-any-return]


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool = False,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's (dq, dk, dv) given the rows' final out and lse (in acc_dtype; dk/dv summed over GQA groups).

    dout, out: (B, Nq, H, D); lse: (B, H, Nq). Padded keys get dk = dv = 0; their values are never read.
    """
    B, Nq, H, _, _ = check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    check_tensor("dout", dout, tuple(q.shape), q.device)
    check_tensor("out", out, tuple(q.shape), q.device)
    check_tensor("lse", lse, (B, H, Nq), q.device)
    impl = _impl(q, k, is_causal, key_padding_mask is not None)
    return impl.backward(  # type: ignore[no-any-return]
        dout, q, k, v, out, lse, is_causal, softmax_scale, key_padding_mask
    )
