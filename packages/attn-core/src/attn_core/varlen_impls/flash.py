"""The flash varlen path (CUDA, fp16/bf16): torch's flash-attention varlen kernels.

``aten._flash_attention_forward`` / ``aten._flash_attention_backward`` with ``cum_seq_q`` /
``cum_seq_k``: one launch for every sequence, native GQA (kv heads are never repeated), any row and
head strides (the last dim contiguous), so strided views of packed tensors go in without copies.
Their LSE is read as (H, total_q) fp32 (flash-attn's unpadded varlen layout); a torch whose kernels
return another layout raises a RuntimeError naming the shape instead of giving wrong results.

Flash reports lse = +inf for a row that sees no key; the contract here is -inf, converted both
ways. Its backward reads the LSE as a contiguous (H, total_q) array and keeps a float32 dq
accumulator of (total_q + 128 * num_seqs) rows: calls whose sequences are short on average
(:data:`MIN_MEAN_SEQLEN`) are left to the bucketed path, which bounds that overhead to 3x.
The launch grid holds at most 65535 sequences: longer lists run in several launches.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_SEQS_PER_CALL", "MIN_MEAN_SEQLEN", "NAME", "backward", "forward", "unsupported_reasons"]

NAME = "flash"

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
# Below this mean sequence length the backward's per-sequence padding (128 rows) outweighs the rows.
MIN_MEAN_SEQLEN = 64
# The kernels put the sequences on the grid's y dimension (at most 65535).
MAX_SEQS_PER_CALL = 1 << 15

_ATEN = torch.ops.aten


def _build_reasons(device: torch.device) -> list[str]:
    reasons = []
    if not (hasattr(_ATEN, "_flash_attention_forward") and hasattr(_ATEN, "_flash_attention_backward")):
        reasons.append("this torch has no aten._flash_attention_forward / _backward")
    elif not torch.backends.cuda.is_flash_attention_available():
        reasons.append("this torch build has no flash attention kernels")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        reasons.append(f"flash attention needs compute capability >= 8.0, {device} has {major}.{minor}")
    return reasons


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, has_padding: bool
) -> list[str]:
    """Why the flash path cannot take this call (empty: it can)."""
    if q.device.type != "cuda":
        return [f"runs on CUDA devices only, got device {q.device}"]
    reasons = _build_reasons(q.device)
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash attention takes float16/bfloat16, got {q.dtype}")
    D = q.shape[-1]
    if D % HEAD_DIM_MULTIPLE != 0 or D > MAX_HEAD_DIM:
        reasons.append(f"flash attention needs head dim D % {HEAD_DIM_MULTIPLE} == 0 and D <= {MAX_HEAD_DIM}, got {D}")
    if has_padding:
        reasons.append("a key_padding_mask is not supported here (the bucketed path takes it)")
    if cu_seqlens_q.device != q.device:
        reasons.append(f"cu_seqlens are on {cu_seqlens_q.device}: the kernels read them on {q.device}")
    num_seqs = cu_seqlens_q.numel() - 1
    if q.shape[0] < MIN_MEAN_SEQLEN * num_seqs:
        reasons.append(
            f"mean sequence length {q.shape[0] / num_seqs:.1f} < {MIN_MEAN_SEQLEN}: the backward pads every "
            "sequence to 128 rows of float32 dq (the bucketed path takes short sequences)"
        )
    return reasons


Launch = tuple[slice | None, slice | None, torch.Tensor, torch.Tensor]


def _launches(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[Launch]:
    """(query rows, key rows, offsets q, offsets k) per launch of at most MAX_SEQS_PER_CALL sequences."""
    num_seqs = cu_seqlens_q.numel() - 1
    if num_seqs <= MAX_SEQS_PER_CALL:
        return [(None, None, cu_seqlens_q, cu_seqlens_k)]
    cuts = [*range(0, num_seqs, MAX_SEQS_PER_CALL), num_seqs]
    index = torch.tensor(cuts, device=cu_seqlens_q.device)
    rows_q, rows_k = cu_seqlens_q[index].tolist(), cu_seqlens_k[index].tolist()  # one host read each
    out: list[Launch] = []
    for i in range(len(cuts) - 1):
        a, b = cuts[i], cuts[i + 1] + 1
        out.append(
            (
                slice(rows_q[i], rows_q[i + 1]),
                slice(rows_k[i], rows_k[i + 1]),
                (cu_seqlens_q[a:b] - rows_q[i]).contiguous(),
                (cu_seqlens_k[a:b] - rows_k[i]).contiguous(),
            )
        )
    return out


def _rows(x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, D) in q's dtype, lse (H, total_q) fp32); key_padding_mask is always None here."""
    H = q.shape[1]
    if q.shape[0] == 0 or cu_seqlens_q.numel() == 1:  # no rows: the kernels refuse an empty launch
        return q.new_zeros(q.shape), torch.full((H, q.shape[0]), float("-inf"), device=q.device)
    outs, lses = [], []
    for rq, rk, cq, ck in _launches(cu_seqlens_q, cu_seqlens_k):
        qs, ks, vs = _rows(q, rq), _rows(k, rk), _rows(v, rk)
        res = _ATEN._flash_attention_forward(
            qs, ks, vs, cq, ck, max_seqlen_q, max_seqlen_k, 0.0, is_causal, False, scale=softmax_scale
        )
        out, lse = res[0], res[1]
        if tuple(lse.shape) != (H, qs.shape[0]):
            raise RuntimeError(
                f"torch {torch.__version__}'s flash varlen forward returned an LSE of shape {tuple(lse.shape)}; "
                f"attn_core reads the unpadded (H, total_q) = {(H, qs.shape[0])} layout"
            )
        outs.append(out)
        lses.append(lse.masked_fill(torch.isposinf(lse), float("-inf")))  # rows without a key: -inf
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses, dim=1)


def backward(
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
    softmax_scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's dtype from the rows' final out and lse (H, total_q)."""
    if q.shape[0] == 0 or cu_seqlens_q.numel() == 1:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    # exp(s - (+inf)) = 0: rows that saw no key anywhere contribute nothing (never NaN); the
    # kernel reads the LSE densely, so a strided one would be read wrong
    lse = torch.where(torch.isneginf(lse), float("inf"), lse).float().contiguous()
    unused = q.new_empty(0, dtype=torch.int64)  # the dropout RNG state: read only when dropout_p > 0
    dqs, dks, dvs = [], [], []
    for rq, rk, cq, ck in _launches(cu_seqlens_q, cu_seqlens_k):
        dq, dk, dv = _ATEN._flash_attention_backward(
            _rows(dout, rq), _rows(q, rq), _rows(k, rk), _rows(v, rk), _rows(out, rq),
            lse if rq is None else lse[:, rq].contiguous(),
            cq, ck, max_seqlen_q, max_seqlen_k, 0.0, is_causal, unused, unused, scale=softmax_scale,
        )  # fmt: skip
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    if len(dqs) == 1:
        return dqs[0], dks[0], dvs[0]
    return torch.cat(dqs), torch.cat(dks), torch.cat(dvs)
