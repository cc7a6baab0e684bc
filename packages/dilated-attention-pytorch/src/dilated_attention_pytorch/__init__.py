"""dilated-attention-pytorch: one import for the whole toolkit.

Re-exports attn_core always, and attn_sparse, attn_ring and memory_runtime when their extras
are installed ([sparse], [ring], [memory], [all]); plus the factories.

Names several packages define (``explain``, ``last_backend``, ``BACKENDS``, ``AUTO_ORDER``,
``BackendChoice``) are attn_core's here; reach the others through their package, e.g.
``dilated_attention_pytorch.attn_sparse.explain``.
"""

from __future__ import annotations

import importlib
import importlib.util

from attn_core import *  # noqa: F403
from attn_core import __all__ as _core_all

from ._version import __version__ as __version__  # the umbrella's own, not attn_core's
from .factory import create_dilated_attention, create_multihead_dilated_attention, resolve_kind

__all__ = [
    *(name for name in _core_all if name != "__version__"),
    "__version__",
    "available_packages",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "resolve_kind",
]

_OPTIONAL = ("attn_sparse", "attn_ring", "memory_runtime")


def available_packages() -> dict[str, bool]:
    """Which of the toolkit's packages are installed."""
    return {"attn_core": True, **{name: importlib.util.find_spec(name) is not None for name in _OPTIONAL}}


for _name in _OPTIONAL:
    if importlib.util.find_spec(_name) is not None:
        _mod = importlib.import_module(_name)
        globals()[_name] = _mod
        for _sym in getattr(_mod, "__all__", ()):
            if _sym != "__version__" and _sym not in globals():
                globals()[_sym] = getattr(_mod, _sym)
                __all__.append(_sym)
del _name
