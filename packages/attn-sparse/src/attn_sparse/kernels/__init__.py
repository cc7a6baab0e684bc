"""Triton kernels for block-sparse attention: forward with LSE and an exact backward.

Modules (each importable on its own; all but :mod:`.planning` need triton, see
``attn_sparse.backends.triton`` for when the kernels can run):

- :mod:`.planning`: the raw CSR tensors the kernels read (:class:`CSR`), tile configs, launch
  orders and the stored-dS chunk plan, in plain torch (no triton needed);
- :mod:`.tiles`: ``@triton.jit`` helpers shared by the kernels (loop bounds, tile loads);
- :mod:`.forward` / :mod:`.backward`: the ``@triton.jit`` kernels;
- :mod:`.launch`: :func:`block_sparse_forward` / :func:`block_sparse_backward`, which size and
  launch them;
- :mod:`.ops`: the ``torch.library`` custom ops and :func:`block_sparse_attention_csr`, the
  differentiable entry point the "triton" backend calls;
- :mod:`.pattern_build`: Triton builders of pattern layouts (not attention).

The backward has two forms. Stored dS (the default where the scratch fits, see
:func:`stored_ds_chunks`): a delta kernel (rowsum(out * dout)), then per chunk of (batch, kv head)
units (and, where one unit does not fit, of key blocks) the dk/dv kernel, which also writes dS
(q.dtype) into a scratch slot per tile, and a row-parallel dq = dS @ K kernel (adding up over
key-block chunks in fp32): 5 matmuls per tile. Recompute: the dq kernel recomputes P and dP (and
writes delta), then the dk/dv kernel: 7 matmuls per tile, no scratch.

Shapes: q (B, Nq, H, D); k, v (B, Nk, Hkv, D); out like q; lse (B, H, Nq) fp32, natural log,
``-inf`` for rows that see no key (whose output is 0).
"""

from typing import TYPE_CHECKING

from attn_core.triton_env import interpret_mode, triton_installed

from .planning import CSR, DsChunk, KernelConfig, KernelMask, default_config, launch_order, row_table, stored_ds_chunks

if TYPE_CHECKING or triton_installed():
    from .launch import block_sparse_backward, block_sparse_forward
    from .ops import block_sparse_attention_csr

__all__ = [
    "CSR",
    "DsChunk",
    "KernelConfig",
    "KernelMask",
    "block_sparse_attention_csr",
    "block_sparse_backward",
    "block_sparse_forward",
    "default_config",
    "interpret_mode",
    "launch_order",
    "row_table",
    "stored_ds_chunks",
]


def __getattr__(name: str) -> object:
    # reached only for names not defined above: the launchers when triton is absent
    if name in ("block_sparse_attention_csr", "block_sparse_backward", "block_sparse_forward"):
        raise ImportError(f"attn_sparse.kernels.{name} needs triton (pip install 'attn-sparse[triton]')")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
