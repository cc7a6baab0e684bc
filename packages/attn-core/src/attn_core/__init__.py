"""attn_core: LongNet dilated attention with exact LSE merging, float64 references and explainable backends."""

from ._version import __version__
from .api import AUTO_ORDER, BACKENDS, BackendChoice, dilated_attention, explain, last_backend
from .config import DilatedConfig
from .longnet import LongNetDecoderLayer, LongNetEncoderLayer, LongNetLM, magneto_gamma
from .merge import merge_into_, merge_partials
from .modules import DilatedAttention, MultiheadDilatedAttention

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendChoice",
    "DilatedAttention",
    "DilatedConfig",
    "LongNetDecoderLayer",
    "LongNetEncoderLayer",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "__version__",
    "dilated_attention",
    "explain",
    "last_backend",
    "magneto_gamma",
    "merge_into_",
    "merge_partials",
]
