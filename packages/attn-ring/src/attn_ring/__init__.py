"""attn_ring: ring attention over torch.distributed.

- :class:`RingComm` (comm.py): the ring communication layer (double-buffered batched P2P,
  handshake, bounded waits, pluggable receive buffers).
- :func:`ring_attention`, :class:`RingAttention` (ring.py, modules.py): exact dense attention
  over a sharded sequence, forward and backward, contiguous or zigzag (balanced causal) layout.
- :func:`shard_sequence` / :func:`unshard_sequence` (sharding.py): "contiguous" and "zigzag".
- :func:`ring_dilated_attention`, :class:`RingDilatedAttention`,
  :class:`RingMultiheadDilatedAttention`: LongNet dilated attention across ranks.
- :func:`ulysses_attention`, :class:`UlyssesAttention` (ulysses.py): head-parallel attention over
  a sequence-sharded input through two all-to-alls (:class:`AllToAllComm`, alltoall.py); dense,
  dilated or block-sparse inside.
- :func:`hybrid_attention`, :class:`HybridAttention`, :func:`hybrid_mesh`, :func:`hybrid_positions`
  (hybrid.py): all-to-all inside a group (a node), ring attention across groups.
- ``ring_block_sparse_attention`` when the optional attn-sparse package is installed
  (imported on first use).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ._version import __version__
from .alltoall import AllToAllComm
from .comm import BufferProvider, PendingTransfer, RingComm, TorchBuffers
from .hybrid import HybridMesh, hybrid_attention, hybrid_mesh, hybrid_positions, hybrid_shard
from .modules import HybridAttention, RingAttention, UlyssesAttention
from .modules_dilated import RingDilatedAttention, RingMultiheadDilatedAttention
from .ring import ring_attention
from .ring_dilated import RingDilatedPlan, plan_ring_dilated, ring_dilated_attention
from .sharding import shard_positions, shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = [
    "AllToAllComm",
    "BufferProvider",
    "HybridAttention",
    "HybridMesh",
    "PendingTransfer",
    "RingAttention",
    "RingComm",
    "RingDilatedAttention",
    "RingDilatedPlan",
    "RingMultiheadDilatedAttention",
    "TorchBuffers",
    "UlyssesAttention",
    "__version__",
    "hybrid_attention",
    "hybrid_mesh",
    "hybrid_positions",
    "hybrid_shard",
    "plan_ring_dilated",
    "ring_attention",
    "ring_dilated_attention",
    "shard_positions",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
]

# Listed for `from attn_ring import *` and the umbrella's re-exports only where it can be imported.
if importlib.util.find_spec("attn_sparse") is not None and importlib.util.find_spec(f"{__name__}.ring_sparse"):
    __all__.append("ring_block_sparse_attention")


def __getattr__(name: str) -> Any:
    # ring_block_sparse_attention needs the optional attn-sparse extra: import it only when asked,
    # so `import attn_ring` works without attn-sparse (ImportError naming the extra otherwise).
    if name == "ring_block_sparse_attention":
        from .ring_sparse import ring_block_sparse_attention

        return ring_block_sparse_attention
    raise AttributeError(f"module 'attn_ring' has no attribute {name!r}")
