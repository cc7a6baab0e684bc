"""attn_sparse: block-sparse attention with CSR block layouts, a safetensors pattern library and
explainable backends (Triton kernel, FlexAttention, pure PyTorch reference), and the per-key-range
primitive with LSE that ring attention builds on (:mod:`attn_sparse.blocks`)."""

from ._version import __version__
from .adaptive import AdaptiveBlockSparseAttention
from .api import AUTO_ORDER, BACKENDS, BackendChoice, block_sparse_attention, explain, last_backend
from .blocks import BLOCK_BACKENDS, block_backend, block_backward, block_forward
from .intervals import KeyIntervals
from .layout import BlockLayout
from .library import FORMAT_VERSION, LayoutCache, PatternLibrary
from .modules import BlockSparseAttention, MultiheadBlockSparseAttention
from .patterns import (
    PATTERNS,
    bigbird,
    build_pattern,
    causal,
    dilated,
    documents,
    global_local,
    hierarchical,
    local_window,
    longnet,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BLOCK_BACKENDS",
    "FORMAT_VERSION",
    "PATTERNS",
    "AdaptiveBlockSparseAttention",
    "BackendChoice",
    "BlockLayout",
    "BlockSparseAttention",
    "KeyIntervals",
    "LayoutCache",
    "MultiheadBlockSparseAttention",
    "PatternLibrary",
    "__version__",
    "bigbird",
    "block_backend",
    "block_backward",
    "block_forward",
    "block_sparse_attention",
    "build_pattern",
    "causal",
    "dilated",
    "documents",
    "explain",
    "global_local",
    "hierarchical",
    "last_backend",
    "local_window",
    "longnet",
]
