"""The differentiable block-sparse attention :func:`block_sparse_attention_csr`, and its custom ops.

``attn_sparse::block_sparse_fwd`` / ``_bwd`` (an :class:`attn_core.custom_op.DifferentiableOp`)
run :func:`.launch.block_sparse_forward` / :func:`.launch.block_sparse_backward`: eager calls
directly (with the layout's :class:`.planning.CSR` and :class:`.planning.KernelConfig` objects),
torch.compile through the ops (fakes for tracing, a registered autograd formula), which receive
the CSR as raw tensors and its geometry and the tile config as int lists and find the layout's
launch data in :data:`.planning.LAUNCH_MEMO` from the tensors' storage.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from attn_core.custom_op import DifferentiableOp

from .launch import block_sparse_backward, block_sparse_forward, device_guard
from .planning import CSR, KernelConfig, KernelMask, default_config

__all__ = ["BLOCK_SPARSE", "SECOND_ORDER_ERROR", "block_sparse_attention_csr"]

_CONFIG_FIELDS = fields(KernelConfig)


# Triton launches on the current CUDA device: make q's current for the launches.
def _forward(q: torch.Tensor, *k_v_csr_and_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with device_guard(q.device):
        return block_sparse_forward(q, *k_v_csr_and_config)


def _backward(dout: torch.Tensor, q: torch.Tensor, *saved_csr_and_config: Any) -> tuple[torch.Tensor, ...]:
    with device_guard(q.device):
        return block_sparse_backward(dout, q, *saved_csr_and_config)


def _encode(csr: CSR, mask: KernelMask, scale: float, cfg: KernelConfig) -> tuple[Any, ...]:
    # op schemas take no dataclasses: the CSR travels as its tensors and dims, the mask as its
    # fields (docs: bounds at query rows, key_docs: at key rows, or None), the config as ints
    config_ints = [int(getattr(cfg, f.name)) for f in _CONFIG_FIELDS]
    return (
        csr.crow, csr.col, csr.ccol, csr.row, csr.dims, bool(mask.banded), int(mask.left), int(mask.right), mask.docs,
        mask.key_docs, float(scale), config_ints,
    )  # fmt: skip


def _decode(
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    row: torch.Tensor,
    dims: list[int],
    banded: bool,
    left: int,
    right: int,
    docs: torch.Tensor | None,
    key_docs: torch.Tensor | None,
    scale: float,
    config_ints: list[int],
) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        f.name: bool(v) if f.type in (bool, "bool") else v for f, v in zip(_CONFIG_FIELDS, config_ints)
    }
    cfg = KernelConfig(**values)
    return CSR.from_tensors(crow, col, ccol, row, dims), KernelMask(banded, left, right, docs, key_docs), scale, cfg


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *csr_and_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=torch.float32)


SECOND_ORDER_ERROR = (
    "double backward (second-order gradients through create_graph=True) is not supported by the "
    "triton backend of block_sparse_attention: its kernels have no derivative of their backward; "
    "use backend='reference' (plain autograd, supports higher-order gradients)"
)

# The ops keep what they derive from the CSR tensors (LAUNCH_MEMO): tensors that a CUDA graph pool
# must not hold past a call, and plans read back from the GPU, which a capture cannot do. So they
# are tagged cudagraph_unsafe: torch.compile(mode="reduce-overhead") runs them between CUDA graphs
# (Inductor partitions the graph around them) instead of failing its pool check.
BLOCK_SPARSE = DifferentiableOp(
    "attn_sparse::block_sparse",
    inputs=("q", "k", "v"),
    outputs=("out", "lse"),
    args_schema=(
        "Tensor crow, Tensor col, Tensor ccol, Tensor row, int[] dims, bool banded, int left, int right, "
        "Tensor? docs, Tensor? key_docs, float scale, int[] cfg"
    ),
    forward=_forward,
    backward=_backward,
    encode=_encode,
    decode=_decode,
    fake=_fake,
    second_order_error=SECOND_ORDER_ERROR,
    tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else (),
)


def block_sparse_attention_csr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    csr: CSR,
    *,
    mask: KernelMask | None = None,
    softmax_scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Differentiable block-sparse attention over raw CSR tensors; out (B, Nq, H, D) in q.dtype.

    Inputs are not validated here (:func:`attn_sparse.block_sparse_attention` validates); ``mask``
    defaults to none (only the key count masks), ``config`` to :func:`default_config` for the
    layout's block size.
    """
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    kmask = mask if mask is not None else KernelMask.causal(False, q.shape[1], k.shape[1])
    cfg = config if config is not None else default_config(csr.block_size, head_dim=D, banded=kmask.banded)
    bad = cfg.check(csr.block_size)
    if bad:
        raise ValueError("kernel config does not fit the layout: " + "; ".join(bad))
    return BLOCK_SPARSE(q, k, v, csr, kmask, float(scale), cfg)
