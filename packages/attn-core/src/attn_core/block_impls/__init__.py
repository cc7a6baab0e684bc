"""Implementations of the block primitives (:func:`attn_core.blocks.block_forward` / ``block_backward``).

:data:`attn_core.blocks.BLOCK_IMPLS` (an :class:`attn_core.registry.BackendRegistry`) loads them
lazily from this package and takes the first, in its order, that gives no reason to refuse a
block; :func:`attn_core.blocks.explain_block` reports the choice and every other implementation's
reasons. Each module provides:

``NAME: str``
``unsupported_reasons(q, k, is_causal, has_padding) -> list[str]``
    Why it cannot take this block (empty: it can). Must be cheap: asked on every call.
``forward(q, k, v, is_causal, softmax_scale, key_padding_mask) -> (out, lse)``
``backward(dout, q, k, v, out, lse, is_causal, softmax_scale, key_padding_mask) -> (dq, dk, dv)``
    Shapes as in :mod:`attn_core.blocks`: q (B, Nq, H, D), k, v (B, Nk, Hkv, D), lse (B, H, Nq);
    gradients in the accumulation dtype (:func:`attn_core.blocks.acc_dtype`).
"""
