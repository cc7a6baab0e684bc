"""Whether Triton is installed and whether it runs in its CPU interpreter, without importing it.

One rule for the Triton backend (:mod:`attn_sparse.backends.triton`), the kernels and the pattern
builders' Triton builds, so they never disagree on which path runs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["interpret_mode", "triton_builds", "triton_installed"]


# find_spec imports nothing but scans sys.path: once, at import (torch.compile cannot trace it)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Triton can be imported (looked up once per process, when this module loads)."""
    return _TRITON_INSTALLED


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_builds(device: torch.device) -> bool:
    """Whether pattern builders on ``device`` take their Triton kernels
    (:mod:`attn_sparse.kernels.pattern_build`): CUDA, Triton installed, and not TRITON_INTERPRET=1
    (the interpreter runs CPU tensors; tests pass ``triton=True`` to the builders for that)."""
    return device.type == "cuda" and triton_installed() and not interpret_mode()
