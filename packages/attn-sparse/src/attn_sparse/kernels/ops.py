"""Forward and backward as ``torch.library`` custom ops, and the differentiable entry point.

``attn_sparse::block_sparse_fwd`` / ``_bwd`` run :func:`.launch.block_sparse_forward` /
:func:`.launch.block_sparse_backward` with a registered autograd formula and fake
implementations, so ``torch.compile`` traces them without graph breaks; eager calls of
:func:`block_sparse_attention_csr` use a plain ``torch.autograd.Function`` around the same
functions (less dispatch overhead).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .._memo import BoundedMemo
from .launch import block_sparse_backward, block_sparse_forward, device_guard
from .planning import CSR, KernelConfig, default_config

__all__ = ["RAW_CSR_DERIVED", "RAW_CSR_ENTRIES", "block_sparse_attention_csr"]


# Under torch.compile the kernels run as torch.library custom ops with a registered autograd
# formula, so the compiler traces them (opaque ops with fake implementations) without graph breaks;
# eager calls take a plain autograd.Function around the same two functions (less dispatch overhead).
# CSR geometry and tile configs travel as int lists (custom op schemas take no dataclasses).
_CFG_FIELDS = tuple(f.name for f in fields(KernelConfig))


def _config_from_ints(values: list[int]) -> KernelConfig:
    kwargs: dict[str, Any] = {
        f.name: bool(v) if f.type in (bool, "bool") else v for f, v in zip(fields(KernelConfig), values)
    }
    return KernelConfig(**kwargs)


def _csr_from_args(
    crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor, row: torch.Tensor, tslot: torch.Tensor, dims: list[int]
) -> CSR:
    heads, nqb, nkb, bq, bk = dims
    # an empty tslot (the forward ran without grad) is derived again if a backward needs it
    return CSR(
        crow, col, ccol, row, heads, nqb, nkb, (bq, bk), tslot=tslot if tslot.numel() == col.numel() else None,
        cache=_RAW_CSR_MEMO.memo_for((crow, col, ccol, row), tuple(dims)),
    )  # fmt: skip


class _RawCSRMemo:
    """Derived launch data (launch tables, chunk plans) of the CSR tensors the custom ops receive.

    Under torch.compile the ops get raw tensors, not the layout (whose cache holds this data in
    eager calls), and would rebuild every table (and read chunk plans back from the GPU) on every
    call. Entries are keyed by the tensors' storage and view geometry, not by tensor objects: the
    compiled backward receives the saved CSR tensors as new tensor objects on every call, over
    the same storage. An entry is valid only while those storages are alive (weak references, so
    memory a freed layout leaves to another never hits a stale entry) and unmodified (version
    counters, which views share). At most RAW_CSR_ENTRIES layouts, each a :class:`BoundedMemo`
    of RAW_CSR_DERIVED entries, least recently used dropped first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...], BoundedMemo]]
        self._entries = OrderedDict()

    def memo_for(
        self, tensors: tuple[torch.Tensor, ...], dims: tuple[int, ...]
    ) -> Callable[[Any, Callable[[], Any]], Any] | None:
        """A (key, build) -> value memo for these CSR tensors, or None when they cannot be tracked."""
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: no memo
            return None
        refs = tuple(StorageWeakRef(t.untyped_storage()) for t in tensors)
        views = tuple((r.cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) for r, t in zip(refs, tensors))
        key = (*views, dims)
        with self._lock:
            entry = self._entries.get(key)
            # a live weak reference pins its storage's address, so a matching key is that storage
            if entry is None or entry[1] != versions or any(r.expired() for r in entry[0]):
                entry = (refs, versions, BoundedMemo(RAW_CSR_DERIVED))
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > RAW_CSR_ENTRIES:
                self._entries.popitem(last=False)
        return entry[2].get


RAW_CSR_ENTRIES = 8
RAW_CSR_DERIVED = 16
_RAW_CSR_MEMO = _RawCSRMemo()

# The ops keep what they derive from the CSR tensors (the memo above): tensors that a CUDA graph
# pool must not hold past a call, and plans read back from the GPU, which a capture cannot do. So
# they are tagged cudagraph_unsafe: torch.compile(mode="reduce-overhead") runs them between CUDA
# graphs (Inductor partitions the graph around them) instead of failing its pool check.
_OP_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("attn_sparse::block_sparse_fwd", mutates_args=(), tags=_OP_TAGS)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    with device_guard(q.device):
        return block_sparse_forward(
            q, k, v, _csr_from_args(crow, col, ccol, row, tslot, dims), is_causal, scale, _config_from_ints(cfg)
        )


@_fwd_op.register_fake
def _fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("attn_sparse::block_sparse_bwd", mutates_args=(), tags=_OP_TAGS)
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(q.device):
        return block_sparse_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            _csr_from_args(crow, col, ccol, row, tslot, dims),
            is_causal,
            scale,
            _config_from_ints(cfg),
        )


@_bwd_op.register_fake
def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    tslot: torch.Tensor,
    dims: list[int],
    is_causal: bool,
    scale: float,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))  # type: ignore[return-value]


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, crow, col, ccol, row, tslot, dims, is_causal, scale, cfg = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, crow, col, ccol, row, tslot)
    ctx.args = (dims, is_causal, scale, cfg)


def _fwd_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    # lse is an auxiliary output (not exposed): its incoming gradient is ignored
    q, k, v, out, lse, crow, col, ccol, row, tslot = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, crow, col, ccol, row, tslot, *ctx.args)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd("attn_sparse::block_sparse_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def block_sparse_attention_csr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    csr: CSR,
    *,
    is_causal: bool = False,
    softmax_scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Differentiable block-sparse attention over raw CSR tensors; out (B, Nq, H, D) in q.dtype.

    Inputs are not validated here (:func:`attn_sparse.block_sparse_attention` validates); ``config`` defaults to
    :func:`default_config` for the layout's block size.
    """
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cfg = config if config is not None else default_config(csr.block_size)
    bad = cfg.check(csr.block_size)
    if bad:
        raise ValueError("kernel config does not fit the layout: " + "; ".join(bad))
    if not torch.compiler.is_compiling():
        # eager: the plain autograd.Function skips the custom-op dispatcher (~0.1-0.3 ms per call)
        with device_guard(q.device):
            out: torch.Tensor = _EagerFn.apply(q, k, v, csr, bool(is_causal), float(scale), cfg)
        return out
    dims = [csr.num_heads, csr.num_query_blocks, csr.num_key_blocks, csr.block_size[0], csr.block_size[1]]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    tslot = csr.transposed_slots() if needs_grad else csr.col.new_empty(0)
    out, _ = _fwd_op(
        q, k, v, csr.crow, csr.col, csr.ccol, csr.row, tslot, dims, bool(is_causal), float(scale),
        [int(getattr(cfg, f)) for f in _CFG_FIELDS],
    )  # fmt: skip
    return out


class _EagerFn(torch.autograd.Function):
    """Eager-mode wrapper of the same forward/backward the custom ops run."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: CSR, is_causal: bool, scale: float,
        cfg: KernelConfig,
    ) -> torch.Tensor:  # fmt: skip
        out, lse = block_sparse_forward(q, k, v, csr, is_causal, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (csr, is_causal, scale, cfg)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        with device_guard(q.device):
            dq, dk, dv = block_sparse_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None
