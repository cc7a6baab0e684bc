"""Whether Triton is installed and how it runs, without importing it: one rule for every package.

attn_core's fused LSE merge, attn_sparse's kernels and pattern builders and attn_ring's path
choices all ask here, so they never disagree on which path runs.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["compiled_triton_available", "interpret_mode", "triton_installed"]

# find_spec imports nothing but scans sys.path: once, at import (torch.compile cannot trace it)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# The spellings of "on" Triton itself accepts for TRITON_INTERPRET.
INTERPRET_ON = ("1", "true", "on", "yes")


def triton_installed() -> bool:
    """Triton can be imported (looked up once per process, when this module loads)."""
    return _TRITON_INSTALLED


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, true, on or yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in INTERPRET_ON


def compiled_triton_available(device: torch.device) -> bool:
    """Whether compiled Triton kernels run on ``device``: CUDA, Triton installed, not in the interpreter
    (which runs CPU tensors only)."""
    return device.type == "cuda" and triton_installed() and not interpret_mode()
