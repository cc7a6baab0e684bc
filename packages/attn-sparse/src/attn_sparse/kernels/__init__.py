"""Triton kernels for block-sparse attention (import needs triton; see ``attn_sparse.backends.triton``)."""

from .block_sparse import (
    CSR,
    DsChunk,
    KernelConfig,
    block_sparse_attention_csr,
    block_sparse_backward,
    block_sparse_forward,
    default_config,
    interpret_mode,
    launch_order,
    row_table,
    stored_ds_chunks,
)

__all__ = [
    "CSR",
    "DsChunk",
    "KernelConfig",
    "block_sparse_attention_csr",
    "block_sparse_backward",
    "block_sparse_forward",
    "default_config",
    "interpret_mode",
    "launch_order",
    "row_table",
    "stored_ds_chunks",
]
