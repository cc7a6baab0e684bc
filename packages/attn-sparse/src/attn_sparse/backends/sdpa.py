"""The "sdpa" backend: causal attention and causal sliding windows as dense causal calls (cuDNN).

It takes the calls whose tiles are the token masks' own (``layout=None``) and whose mask is
causal, optionally with a window of ``left`` tokens (``window_size=(left, right)``; causal caps
``right`` at 0), on one sequence per batch row (no ``cu_seqlens``, Nq == Nk; key padding allowed):

* causal without a binding window: one causal call over the whole sequence;
* a window: query i sees keys i - left .. i. Cut the sequence into chunks of C = left tokens.
  The rows of chunk c see two triangles: the keys of chunk c itself, causally (key offset
  <= row offset), and the keys of chunk c - 1 at key offset >= row offset. Reversing the rows
  and the keys inside each chunk turns the second triangle into a causal one too. So the window
  is two batched causal calls (the chunks as the batch; the second on reversed copies), merged
  by their log-sum-exp: about N * left pairs computed, the window's own count, at the rate of
  dense causal attention on C-row sequences. The backward runs both calls' backward from the
  merged out and LSE (:func:`attn_core.sdpa_ops.attention_backward`), exact.

Key padding (``key_padding_mask`` (B, N), True = padding) is an additive -inf bias on the keys of
every call, sliced and reversed like the keys; padded keys' rows are zeroed first (never read).

Kernels are :mod:`attn_core.sdpa_ops`' (cuDNN on CUDA: fp16/bf16, D % 8 == 0, D <= 128; the CPU
flash kernel on CPU, any float dtype). Windows shorter than :data:`MIN_WINDOW` are left to the
Triton kernel: on chunks that short, dense causal calls are slower than it
(docs/benchmarks/sparse_masks_h200.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attn_core import sdpa_ops
from attn_core.blocks import acc_dtype, drop_padded_keys
from attn_core.custom_op import DifferentiableOp

if TYPE_CHECKING:
    from ..layout import BlockLayout
    from ..masks import TokenMask

__all__ = ["MIN_WINDOW", "NAME", "SUPPORTS_KEY_PADDING_MASK", "block_sparse_attention", "unsupported_reasons"]

NAME = "sdpa"
SUPPORTS_KEY_PADDING_MASK = True
# The shortest window (left, in tokens) this backend takes: the chunk length of its causal calls.
MIN_WINDOW = 1 << 62


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask
) -> list[str]:
    """Why this call is not dense causal attention on chunks (empty list: it is). Launches nothing."""
    reasons = sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])
    n_q, n_k = q.shape[1], k.shape[1]
    if not mask.causal:
        reasons.append("needs is_causal=True (it runs dense causal calls)")
    if mask.cu_seqlens is not None:
        reasons.append("packed documents (cu_seqlens) are not supported")
    if n_q != n_k:
        reasons.append(f"needs as many queries as keys, got Nq={n_q}, Nk={n_k}")
    left, _ = mask.sides()
    if 0 <= left < min(MIN_WINDOW, n_q - 1):
        reasons.append(f"window left={left} is shorter than {MIN_WINDOW} tokens (the Triton kernel is faster there)")
    if layout.derived_from != mask.derivation_key(n_q, n_k):
        reasons.append("a layout was given: this backend computes only the token masks (layout=None)")
    return reasons


def _chunks(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """Rows start .. start + count * size of x (B, N, h, D) as (B * count, h, size, D): a view
    when the rows allow one, else a copy."""
    B, _, h, D = x.shape
    return x[:, start : start + count * size].reshape(B * count, size, h, D).transpose(1, 2)


def _reversed_chunks(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """Rows start .. of x (B, N, h, D) in ``count`` chunks of ``size`` rows, each chunk's rows in
    reverse order, rows past N zero: (B * count, h, size, D), a new tensor."""
    B, N, h, D = x.shape
    n = min(N - start, count * size)
    full, rest = divmod(n, size)
    out = x.new_empty(B, count, size, h, D)
    if full:
        out[:, :full] = x[:, start : start + full * size].reshape(B, full, size, h, D).flip(2)
    if rest:
        # the last chunk is partial: its rows sit at the end once reversed, zeros before them
        out[:, full, : size - rest] = 0
        out[:, full, size - rest :] = x[:, start + full * size : start + n].flip(1)
    return out.view(B * count, size, h, D).transpose(1, 2)


def _unreversed(y: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """(B * count, h, size, D) of reversed chunks back to rows in order: (B, n, h, D) (the first n)."""
    count_b, h, size, D = y.shape
    return y.transpose(1, 2).flip(1).reshape(batch, (count_b // batch) * size, h, D)[:, :n]


def _lse_of_chunks(lse: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * count, h, size) per-chunk LSE -> (B, h, count * size), rows in order."""
    count_b, h, size = lse.shape
    return lse.view(batch, count_b // batch, h, size).permute(0, 2, 1, 3).reshape(batch, h, -1)


def _chunk_lse(lse: torch.Tensor, start: int, count: int, size: int, reverse: bool) -> torch.Tensor:
    """The (B, h, N) LSE of rows start .. as (B * count, h, size) chunks (reversed, -inf past N)."""
    B, h, N = lse.shape
    n = min(N - start, count * size)
    padded = lse.new_full((B, h, count * size), float("-inf"))
    padded[:, :, :n] = lse[:, :, start : start + n]
    chunks = padded.view(B, h, count, size).permute(0, 2, 1, 3).reshape(B * count, h, size)
    return chunks.flip(-1) if reverse else chunks


def _layout(n: int, left: int) -> tuple[int, int, int]:
    """(C, full chunks, rows in the partial last chunk); C = 0: no binding window, one causal call."""
    if left < 0 or left >= n - 1:
        return 0, 0, 0
    full, rest = divmod(n, left)
    return left, full, rest


def _bias_chunks(bias: torch.Tensor | None, start: int, count: int, size: int) -> torch.Tensor | None:
    """Key bias (B, N) of keys start .. start + count * size as (B * count, size)."""
    return None if bias is None else bias[:, start : start + count * size].reshape(-1, size)


def _reversed_bias(bias: torch.Tensor | None, count: int, size: int) -> torch.Tensor | None:
    """Key bias of the first count * size keys, each chunk reversed: (B * count, size)."""
    if bias is None:
        return None
    return bias[:, : count * size].reshape(bias.shape[0], count, size).flip(2).reshape(-1, size)


def _causal_fwd(qkv: list[torch.Tensor], bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense causal call on (batch, heads, n, D) views q, k, v: (out, lse)."""
    q, k, v = qkv
    return sdpa_ops.attention_forward(q, k, v, is_causal=True, scale=scale, key_bias=bias)


def _causal_bwd(
    saved: list[torch.Tensor], lse: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its (dq, dk, dv) from saved = (dout, q, k, v, out) views and the rows' final lse."""
    dout, q, k, v, out = saved
    return sdpa_ops.attention_backward(dout, q, k, v, out, lse, is_causal=True, scale=scale, key_bias=bias)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, left: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, H, D) and lse (B, H, N) of causal attention with a window of ``left`` keys back;
    bias: (B, N) additive key bias (0 or -inf) or None."""
    B, N, H, D = q.shape
    size, full, rest = _layout(N, left)
    if size == 0:
        o, lse = _causal_fwd([x.transpose(1, 2) for x in (q, k, v)], bias, scale)
        return o.transpose(1, 2).contiguous(), lse
    out = q.new_empty(B, N, H, D)
    lse = torch.empty(B, H, N, dtype=acc_dtype(q.dtype), device=q.device)
    # each chunk against its own keys (the diagonal triangles), the partial last chunk on its own
    if full:
        o, lc = _causal_fwd([_chunks(x, 0, full, size) for x in (q, k, v)], _bias_chunks(bias, 0, full, size), scale)
        out[:, : full * size] = o.transpose(1, 2).reshape(B, full * size, H, D)
        lse[:, :, : full * size] = _lse_of_chunks(lc, B)
    if rest:
        tail = [x[:, full * size :].transpose(1, 2) for x in (q, k, v)]
        o, lc = _causal_fwd(tail, None if bias is None else bias[:, full * size :], scale)
        out[:, full * size :] = o.transpose(1, 2)
        lse[:, :, full * size :] = lc
    # each chunk after the first against the previous chunk's keys, reversed into causal form
    prev = full + (rest > 0) - 1
    reversed_qkv = [_reversed_chunks(q, size, prev, size), *(_reversed_chunks(x, 0, prev, size) for x in (k, v))]
    o, lc = _causal_fwd(reversed_qkv, _reversed_bias(bias, prev, size), scale)
    o_rows = _unreversed(o, B, N - size)
    l_rows = _lse_of_chunks(lc.flip(-1), B)[:, :, : N - size]
    sdpa_ops.merge_views_(out[:, size:].transpose(1, 2), lse[:, :, size:], o_rows.transpose(1, 2), l_rows)
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    left: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_forward` from its final out and lse."""
    B, N, _, D = q.shape
    size, full, rest = _layout(N, left)
    if size == 0:
        grads = _causal_bwd([x.transpose(1, 2) for x in (dout, q, k, v, out)], lse, bias, scale)
        return tuple(g.transpose(1, 2).contiguous() for g in grads)  # type: ignore[return-value]
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if full:
        lc = _chunk_lse(lse, 0, full, size, reverse=False)
        chunks = [_chunks(x, 0, full, size) for x in (dout, q, k, v, out)]
        gq, gk, gv = _causal_bwd(chunks, lc, _bias_chunks(bias, 0, full, size), scale)
        for grad, g in ((dq, gq), (dk, gk), (dv, gv)):
            grad[:, : full * size] = g.transpose(1, 2).reshape(B, full * size, grad.shape[2], D)
    if rest:
        t = [x[:, full * size :].transpose(1, 2) for x in (dout, q, k, v, out)]
        tail_bias = None if bias is None else bias[:, full * size :]
        gq, gk, gv = _causal_bwd(t, lse[:, :, full * size :], tail_bias, scale)
        for grad, g in ((dq, gq), (dk, gk), (dv, gv)):
            grad[:, full * size :] = g.transpose(1, 2)
    prev = full + (rest > 0) - 1
    saved = [
        *(_reversed_chunks(x, size, prev, size) for x in (dout, q)),
        *(_reversed_chunks(x, 0, prev, size) for x in (k, v)),
        _reversed_chunks(out, size, prev, size),
    ]
    lse_rev = _chunk_lse(lse, size, prev, size, reverse=True)
    gq, gk, gv = _causal_bwd(saved, lse_rev, _reversed_bias(bias, prev, size), scale)
    dq[:, size:] += _unreversed(gq, B, N - size)
    dk[:, : prev * size] += _unreversed(gk, B, prev * size)
    dv[:, : prev * size] += _unreversed(gv, B, prev * size)
    return dq, dk, dv


def _fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, left: int, scale: float
) -> tuple[torch.Tensor, ...]:
    B, N, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=acc_dtype(q.dtype))


CAUSAL_CHUNKS = DifferentiableOp(
    "attn_sparse::causal_chunks",
    inputs=("q", "k", "v"),
    outputs=("out", "lse"),
    args_schema="Tensor? key_bias, int left, float scale",
    forward=_forward,
    backward=_backward,
    encode=lambda bias, left, scale: (bias, left, scale),
    decode=lambda bias, left, scale: (bias, left, scale),
    fake=_fake,
    second_order_error=(
        "double backward (second-order gradients through create_graph=True) is not supported by the "
        "sdpa backend of block_sparse_attention; use backend='reference'"
    ),
)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (B, N, H, D) in q.dtype of causal (windowed) attention; exact gradients in q, k, v.
    key_padding_mask: (B, N) bool, True = padding key."""
    left, _ = mask.sides()
    bias = None
    if key_padding_mask is not None:
        k, v = drop_padded_keys(k, v, key_padding_mask)
        bias = sdpa_ops.key_bias_from_mask(key_padding_mask, q.dtype)
    return CAUSAL_CHUNKS(q, k, v, bias, int(left), float(softmax_scale))
