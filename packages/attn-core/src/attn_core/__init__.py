"""attn_core: LongNet dilated attention with exact LSE merging, float64 references and explainable backends."""

from ._version import __version__
from .config import DilatedConfig
from .merge import merge_into_, merge_partials

__all__ = ["DilatedConfig", "__version__", "merge_into_", "merge_partials"]
