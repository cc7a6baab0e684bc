"""attn_core: LongNet dilated attention with exact LSE merging, float64 references and explainable backends."""

from . import sdpa_ops as sdpa_ops
from . import varlen as varlen
from . import views as views
from ._version import __version__
from .api import AUTO_ORDER, BACKENDS, dilated_attention, explain, last_backend
from .blocks import explain_block
from .config import DilatedConfig
from .longnet import LongNetDecoderLayer, LongNetEncoderLayer, LongNetLM, magneto_gamma
from .merge import merge_into_, merge_partials
from .modules import DilatedAttention, MultiheadDilatedAttention
from .packing import pack_sequences, unpack_sequences
from .registry import BackendChoice, BackendRegistry

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendChoice",
    "BackendRegistry",
    "DilatedAttention",
    "DilatedConfig",
    "LongNetDecoderLayer",
    "LongNetEncoderLayer",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "__version__",
    "dilated_attention",
    "explain",
    "explain_block",
    "last_backend",
    "magneto_gamma",
    "merge_into_",
    "merge_partials",
    "pack_sequences",
    "unpack_sequences",
]
