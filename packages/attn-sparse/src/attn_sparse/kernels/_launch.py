"""What every kernel launch of attn_sparse.kernels needs, in one place."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["device_guard"]


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` the current CUDA device while kernels launch (Triton launches on the current
    one); switches only when it differs (a no-op for the CPU, the interpreter's tensors, and
    "cuda" without an index, which means the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
