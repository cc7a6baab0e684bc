"""Low-level attention with LSE on (possibly strided) batches of attention problems, via torch's ATen SDPA ops.

One call computes softmax attention for a batch of independent problems laid out as

    q: (B, h, n, D)    k, v: (B, hk, n, D) with h % hk == 0 (GQA: query head i reads kv head i // (h // hk))

with *any* strides as long as the last dim is contiguous. A dilated segment batch is such a view
(batch = segments with stride w*H*D, heads sharing an offset with stride r*D, rows with stride
r*H*D), so dilated attention needs no gathered copies of q, k, v.

* :func:`attention_forward` returns ``out`` (B, h, n, D) (fresh) and ``lse`` (B, h, n) (fp32;
  fp64 for fp64 inputs). Rows with no attendable key give out 0 and lse -inf.
* :func:`attention_backward` takes the rows' *final* out and lse (e.g. merged over several
  dilation groups or ring steps) and returns this call's (dq, dk, dv); with the merged statistics
  the sum of the per-call gradients is exactly the gradient of the merged output.

Kernels (chosen by measurement on an H100, torch 2.11, bf16, N=256K, H=16, D=128 on dilated views;
see docs/benchmarks/dilated_h100.md):

* ``"cudnn"`` (CUDA, fp16/bf16, D % 8 == 0, D <= 128): ``aten._scaled_dot_product_cudnn_attention``.
  Accepts strided views, GQA, an additive key bias and a strided LSE in backward; it gave
  655 TFLOP/s forward on the (2048, 1) view batch against 346 for the flash op.
* The CUDA flash op was rejected: 2x slower on these views, and its backward silently returns
  wrong gradients when given a strided LSE. The memory-efficient op was rejected: no GQA and it
  requires a contiguous LSE.
* ``"cpu"`` (CPU, any float dtype): ``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward (GQA and a float mask supported).

``key_bias``: (B, nk) additive float in q's dtype, 0 = attend, -inf = padding key; it is broadcast
to every head and row without materialising (B, h, nq, nk).

The block primitives (:mod:`attn_core.blocks`) use these kernels on CUDA through
:mod:`attn_core.block_impls.cudnn`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from .blocks import acc_dtype
from .merge import merge_into_
from .triton_env import interpret_mode, triton_installed

__all__ = [
    "CUDNN_MAX_HEAD_DIM",
    "attention_backward",
    "attention_forward",
    "key_bias_from_mask",
    "merge_strided_",
    "merge_views_",
    "strided_head_calls",
    "unsupported_reasons",
]

# cuDNN's fused attention (forward and backward) on sm80/sm90 covers head dims up to 128 in steps of 8.
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8
# Key bias rows are allocated with this many elements of slack so every row start is 16-byte aligned.
BIAS_ALIGN = 8

_ATEN = torch.ops.aten
_CUDNN_STATE_LOCK = threading.Lock()
_CUDNN_OK: dict[int, list[str]] = {}  # device index -> reasons (empty: usable); bounded by the GPU count
_UNUSED_RNG_STATE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _cudnn_device_reasons(device: torch.device) -> list[str]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return list(_cudnn_reasons_of(idx))


def _cudnn_reasons_of(idx: int) -> tuple[str, ...]:
    with _CUDNN_STATE_LOCK:
        if idx in _CUDNN_OK:
            return tuple(_CUDNN_OK[idx])
    reasons: list[str] = []
    if not hasattr(_ATEN, "_scaled_dot_product_cudnn_attention_backward"):
        reasons.append(f"torch {torch.__version__} has no aten._scaled_dot_product_cudnn_attention_backward")
    if not torch.backends.cudnn.is_available():
        reasons.append("cuDNN is not available")
    else:
        version = torch.backends.cudnn.version() or 0
        if version < 90000:
            reasons.append(f"cuDNN attention needs cuDNN >= 9.0, found {version}")
    major, minor = torch.cuda.get_device_capability(idx)
    if major < 8:
        reasons.append(f"cuDNN attention needs compute capability >= 8.0, device {idx} has {major}.{minor}")
    with _CUDNN_STATE_LOCK:
        _CUDNN_OK[idx] = reasons
    return tuple(reasons)


# torch.compile runs _cudnn_reasons_of at trace time and keeps its result as a constant: it cannot
# trace the cuDNN / capability queries or the lock, and the result is a per-process fact of the
# device. This is the mark torch.compiler.assume_constant_result sets; calling that would import
# torch._dynamo (and with it triton) whenever attn_core is imported (tests check both).
_cudnn_reasons_of._dynamo_marked_constant = True  # type: ignore[attr-defined]


def unsupported_reasons(
    device: torch.device, dtype: torch.dtype, head_dim: int, *, dropout_p: float = 0.0
) -> list[str]:
    """Why no kernel of this module can take attention on ``device`` with ``dtype`` and ``head_dim`` (empty: one can)."""
    reasons: list[str] = []
    if dropout_p > 0.0:
        reasons.append(f"dropout_p={dropout_p} > 0 is not supported by the sdpa kernels (only 0.0)")
    if device.type == "cpu":
        return reasons
    if device.type != "cuda":
        return [*reasons, f"device type {device.type!r} is not supported (cpu or cuda only)"]
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"cuDNN attention takes float16/bfloat16 on CUDA, got {dtype}")
    if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % CUDNN_HEAD_DIM_MULTIPLE != 0:
        reasons.append(
            f"cuDNN attention needs head dim D % {CUDNN_HEAD_DIM_MULTIPLE} == 0 and D <= {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
        )
    return reasons + _cudnn_device_reasons(device)


def _bias4(key_bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """(B, nk) additive key bias -> (B, h, nq, nk) broadcast view (stride 0 on heads and rows)."""
    if key_bias is None:
        return None
    B, h, nq, _ = q.shape
    nk = k.shape[2]
    if key_bias.stride(-1) != 1 or key_bias.stride(0) % BIAS_ALIGN != 0:
        padded = torch.zeros(B, -(-nk // BIAS_ALIGN) * BIAS_ALIGN, dtype=q.dtype, device=q.device)
        padded[:, :nk] = key_bias
        key_bias = padded[:, :nk]
    return key_bias[:, None, None, :].expand(B, h, nq, nk)


def _empty_rows(key_bias: torch.Tensor, is_causal: bool, nq: int) -> torch.Tensor:
    """(B, nq) bool: rows that see no attendable key (all keys, or all keys <= the row when causal, are -inf)."""
    masked = torch.isneginf(key_bias)
    if not is_causal:
        return masked.all(dim=-1, keepdim=True).expand(masked.shape[0], nq)
    # row t is empty iff keys 0..t are all masked: a running AND along the row index (nq == nk when causal)
    return torch.cumprod(masked.to(torch.int8), dim=-1).bool()


def _unused_rng_state(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's backward signature wants the forward's philox seed/offset; without dropout they are unused."""
    idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with _CUDNN_STATE_LOCK:
        cached = _UNUSED_RNG_STATE.get(idx)
    if cached is not None:
        return cached
    tiny = torch.zeros(1, 1, 8, q.shape[-1], dtype=q.dtype, device=q.device)
    res = _ATEN._scaled_dot_product_cudnn_attention(tiny, tiny, tiny, None, True, 0.0, False, False, scale=1.0)
    pair = (res[6], res[7])
    with _CUDNN_STATE_LOCK:
        _UNUSED_RNG_STATE[idx] = pair
    return pair


def _check_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, key_bias: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"expected q (B, h, nq, D) and k, v (B, hk, nk, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a positive multiple of kv heads {k.shape[1]}")
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"is_causal needs as many queries as keys here, got nq={q.shape[2]}, nk={k.shape[2]}")
    if key_bias is not None and (key_bias.shape != (q.shape[0], k.shape[2]) or key_bias.dtype != q.dtype):
        raise ValueError(
            f"key_bias must be ({q.shape[0]}, {k.shape[2]}) of dtype {q.dtype}, "
            f"got {tuple(key_bias.shape)} {key_bias.dtype}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, h, nq, D) in q's dtype and lse (B, h, nq) fp32 (fp64 for fp64) for q (B, h, nq, D), k/v (B, hk, nk, D).

    ``is_causal``: row t sees keys 0..t (needs nq == nk). key_bias: (B, nk). Empty rows: out 0, lse -inf.
    """
    _check_layout(q, k, v, is_causal, key_bias)
    if q.device.type == "cuda":
        bias = _bias4(key_bias, q, k)
        res = _ATEN._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, is_causal, False, scale=scale)
        out, lse = res[0], res[1]
        lse = lse.reshape(q.shape[:3])  # cuDNN returns (B, h, n, 1)
        return out, lse  # cuDNN already gives out 0 / lse -inf for fully masked rows
    mask = None if key_bias is None else key_bias[:, None, None, :]
    out, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    lse = lse.to(acc_dtype(q.dtype))
    if key_bias is not None:
        # the CPU kernel reports lse 0 for a row whose keys are all masked; the contract is -inf
        empty = _empty_rows(key_bias, is_causal, q.shape[2])[:, None, :]
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this call given the rows' final ``out`` (B, h, n, D) and ``lse`` (B, h, n), any strides.

    Rows whose final lse is -inf (no key anywhere) get zero gradients. dk, dv are summed over the
    query heads that share a kv head (GQA).
    """
    _check_layout(q, k, v, is_causal, key_bias)
    # exp(s - (+inf)) = 0: rows that saw no key anywhere contribute nothing (and never NaN)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if q.device.type == "cuda":
        nq, nk = q.shape[2], k.shape[2]
        if nq == 1 and nk == 1:  # cuDNN refuses s_q = s_kv = 1 (1-token documents and tail pieces)
            return one_pair_backward(dout, q, k, v, out, lse, scale=scale, key_bias=key_bias)
        bias = _bias4(key_bias, q, k)
        seed, offset = _unused_rng_state(q)
        dq, dk, dv = _ATEN._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.float().unsqueeze(-1), seed, offset, bias, None, None, nq, nk, 0.0, is_causal,
            scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    mask = None if key_bias is None else key_bias[:, None, None, :]
    dq, dk, dv = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
        dout,
        q,
        k,
        v,
        out,
        lse.float() if q.dtype != torch.float64 else lse,
        0.0,
        is_causal,
        attn_mask=mask,
        scale=scale,
    )
    return dq, dk, dv


def one_pair_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_backward's gradients in closed form for one query and one key: q (B, h, 1, D), k/v (B, hk, 1, D).

    ``out``/``lse`` are the row's final (merged) statistics, +inf where the row saw no key. With
    p = exp(s - lse) for the one score s: dv = p * dout, ds = p * (dout . v - dout . out),
    dq = scale * ds * k, dk = scale * ds * q; dk/dv summed over the query heads of each kv head.
    """
    B, h, _, D = q.shape
    hk = k.shape[1]
    group = h // hk
    f = acc_dtype(q.dtype)
    k_rows = k.to(f).repeat_interleave(group, dim=1)  # (B, h, 1, D): the kv head of each query head
    v_rows = v.to(f).repeat_interleave(group, dim=1)
    score = (q.to(f) * k_rows).sum(-1) * scale  # (B, h, 1)
    if key_bias is not None:
        score = score + key_bias.to(f)[:, None, :]
    p = torch.exp(score - lse.to(f))  # -inf bias or +inf lse -> 0
    do = dout.to(f)
    ds = p * ((do * v_rows).sum(-1) - (do * out.to(f)).sum(-1)) * scale
    dq = ds.unsqueeze(-1) * k_rows
    dk = (ds.unsqueeze(-1) * q.to(f)).view(B, hk, group, 1, D).sum(2)
    dv = (p.unsqueeze(-1) * do).view(B, hk, group, 1, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def strided_head_calls(q_heads: Sequence[int], kv_heads: Sequence[int]) -> list[tuple[int, int, int, int, int, int]]:
    """Split a strided run of query heads into kernel calls whose kv heads are a strided run too.

    q_heads: an arithmetic run of query head indices; kv_heads[i]: the kv head query head
    q_heads[i] reads. Returns (q_h0, q_hs, q_hn, kv_h0, kv_hs, kv_hn) per call; query head i of a
    call reads kv head i // (q_hn // kv_hn) of the call (native GQA: K/V are never repeated).
    """
    n = len(q_heads)
    if n == 0 or len(kv_heads) != n:
        raise ValueError(f"need one kv head per query head, got {n} query heads and {len(kv_heads)} kv heads")
    q_hs = q_heads[1] - q_heads[0] if n > 1 else 1
    distinct = sorted(set(kv_heads))
    if len(distinct) == n:  # one kv head per query head: a strided run?
        kv_hs = kv_heads[1] - kv_heads[0] if n > 1 else 1
        if all(kv_heads[i] == kv_heads[0] + i * kv_hs for i in range(n)):
            return [(q_heads[0], q_hs, n, kv_heads[0], kv_hs, n)]
    per = n // len(distinct)
    if (
        per * len(distinct) == n
        and distinct == list(range(distinct[0], distinct[0] + len(distinct)))
        and all(kv_heads[i] == distinct[0] + i // per for i in range(n))
    ):  # consecutive query heads share consecutive kv heads
        return [(q_heads[0], q_hs, n, distinct[0], 1, len(distinct))]
    calls = []  # otherwise one call per kv head (its query heads are a consecutive part of the run)
    for c in distinct:
        run = [j for j, u in zip(q_heads, kv_heads) if u == c]
        calls.append((run[0], q_hs, len(run), c, 1, 1))
    return calls


def key_bias_from_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key bias of a bool padding mask (True = padding): -inf there, 0 elsewhere; None passes through."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def merge_views_(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_blk: torch.Tensor,
    lse_blk: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """In-place LSE merge on strided (B, h, n, D) / (B, h, n) views: the fused Triton pass on CUDA when
    triton is installed, else :func:`attn_core.merge.merge_into_` on transposed views (same math).

    rows: None, or int64 (n,) distinct indices into the accumulators' n dim (which may then be longer
    than the block's): row t of the block merges into accumulator row rows[t].
    """
    # the fused merge is a Triton kernel; attn-core installed without [triton] merges with merge_into_
    if out_acc.is_cuda and triton_installed():
        merge_strided_(out_acc, lse_acc, out_blk, lse_blk, rows)
    elif rows is None:
        merge_into_(out_acc.transpose(1, 2), lse_acc, out_blk.transpose(1, 2), lse_blk)
    else:
        acc_o, acc_l = out_acc.index_select(2, rows), lse_acc.index_select(2, rows)
        merge_into_(acc_o.transpose(1, 2), acc_l, out_blk.transpose(1, 2), lse_blk)
        out_acc.index_copy_(2, rows, acc_o)
        lse_acc.index_copy_(2, rows, acc_l)


# Fused LSE merge (Triton): rows per program; the head dim is one power-of-two tile (D <= 256).
MERGE_BLOCK_ROWS = 32
_MERGE_KERNELS: dict[bool, object] = {}  # keyed on TRITON_INTERPRET (a compile-time setting): at most 2
_MERGE_LOCK = threading.Lock()


def _merge_kernel() -> object:
    """The Triton merge kernel, built lazily (triton is optional; TRITON_INTERPRET is read at decoration)."""
    interpret = interpret_mode()
    with _MERGE_LOCK:
        kernel = _MERGE_KERNELS.get(interpret)
        if kernel is not None:
            return kernel
        import triton
        import triton.language as tl

        @triton.jit
        def _merge(
            O, L, C, LC, ROWS,  # accumulator out / lse (strided views), block out / lse, acc row of each t
            n_rows, nh, n,  # rows are (batch, head, t) flattened; nh heads, n rows per (batch, head)
            s_ob, s_oh, s_on, s_lb, s_lh, s_ln, s_cb, s_ch, s_cn, s_kb, s_kh, s_kn,
            D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr,
        ):  # fmt: skip
            # int64 index math: element offsets exceed 2^31 at N >= 1M (batch stride w*H*D times segments)
            rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = rows < n_rows
            t = rows % n
            bh = rows // n
            hh = bh % nh
            b = bh // nh
            if HAS_ROWS:
                t_acc = tl.load(ROWS + t, mask=rmask, other=0).to(tl.int64)
            else:
                t_acc = t
            l_acc = tl.load(L + b * s_lb + hh * s_lh + t_acc * s_ln, mask=rmask, other=float("-inf"))
            l_blk = tl.load(LC + b * s_kb + hh * s_kh + t * s_kn, mask=rmask, other=float("-inf"))
            m = tl.maximum(l_acc, l_blk)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # both empty: weights 0, lse stays -inf
            e_acc = tl.exp(l_acc - m_safe)
            e_blk = tl.exp(l_blk - m_safe)
            # tot >= 1 whenever either side is finite (the max contributes exp(0)); tot == 0 only when both are empty
            tot = tl.maximum(e_acc + e_blk, 1.0)
            new = tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(tot))
            inv = 1.0 / tot
            w_acc = (e_acc * inv)[:, None]
            w_blk = (e_blk * inv)[:, None]
            d = tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (d[None, :] < D)
            o_ptr = O + (b * s_ob + hh * s_oh + t_acc * s_on)[:, None] + d[None, :]
            c_ptr = C + (b * s_cb + hh * s_ch + t * s_cn)[:, None] + d[None, :]
            o = tl.load(o_ptr, mask=m2, other=0.0).to(tl.float32)
            c = tl.load(c_ptr, mask=m2, other=0.0).to(tl.float32)
            tl.store(o_ptr, (w_acc * o + w_blk * c).to(O.dtype.element_ty), mask=m2)
            tl.store(L + b * s_lb + hh * s_lh + t_acc * s_ln, new.to(L.dtype.element_ty), mask=rmask)

        _MERGE_KERNELS[interpret] = _merge
        return _merge


def merge_strided_(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_blk: torch.Tensor,
    lse_blk: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """Fused in-place LSE merge on strided views: (out_acc, lse_acc) <- merge(acc, blk), fp32 arithmetic.

    out_blk: (B, h, n, D) (any strides, last dim contiguous); lse_blk: (B, h, n); out_acc (B, h, n_acc, D)
    and lse_acc (B, h, n_acc) with n_acc == n, or with ``rows`` (int64 (n,) distinct indices below
    n_acc on the same device): block row t merges into accumulator row rows[t] (no gather or scatter copies).
    One pass, one rounding of out_acc; the same math as :func:`attn_core.merge.merge_into_`
    (weights exp(lse - L), empty rows stay 0 / -inf) without its full-size fp32 temporaries.
    Needs triton (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    """
    B, h, n, D = out_blk.shape
    n_acc = n if rows is None else out_acc.shape[2]
    if (
        out_acc.shape != (B, h, n_acc, D)
        or lse_acc.shape != (B, h, n_acc)
        or lse_blk.shape != (B, h, n)
        or (rows is not None and rows.shape != (n,))
    ):
        raise ValueError(
            f"merge_strided_: shapes out_acc {tuple(out_acc.shape)}, out_blk {tuple(out_blk.shape)}, "
            f"lse_acc {tuple(lse_acc.shape)}, lse_blk {tuple(lse_blk.shape)}"
            + ("" if rows is None else f", rows {tuple(rows.shape)}")
            + " do not match"
        )
    if out_acc.stride(-1) != 1 or out_blk.stride(-1) != 1:
        raise ValueError("merge_strided_ needs a contiguous last dim in out_acc and out_blk")
    n_rows = B * h * n
    if n_rows == 0:
        return
    import triton

    kernel = _merge_kernel()
    grid = (triton.cdiv(n_rows, MERGE_BLOCK_ROWS),)
    kernel[grid](  # type: ignore[index]
        out_acc, lse_acc, out_blk, lse_blk, lse_blk if rows is None else rows, n_rows, h, n,
        *out_acc.stride()[:3], *lse_acc.stride(), *out_blk.stride()[:3], *lse_blk.stride(),
        D=D, BLOCK_R=MERGE_BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(D), HAS_ROWS=rows is not None,
    )  # fmt: skip
