"""Implementations of the varlen primitives (:func:`attn_core.varlen.varlen_forward` / ``varlen_backward``).

:data:`attn_core.varlen.VARLEN_IMPLS` (an :class:`attn_core.registry.BackendRegistry`) loads them
lazily from this package and takes the first, in its order, that gives no reason to refuse a
call; :func:`attn_core.varlen.explain_varlen` reports the choice and every other implementation's
reasons. Each module provides:

``NAME: str``
``unsupported_reasons(q, k, cu_seqlens_q, max_seqlen_q, has_padding) -> list[str]``
    Why it cannot take this call (empty: it can). Cheap: asked on every call, reads no tensor data.
``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, key_padding_mask) -> (out, lse)``
``backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, key_padding_mask) -> (dq, dk, dv)``
    Shapes as in :mod:`attn_core.varlen`: q (total_q, H, D), k, v (total_k, Hkv, D), lse (H, total_q);
    inputs already validated; gradients in q's dtype.
"""
