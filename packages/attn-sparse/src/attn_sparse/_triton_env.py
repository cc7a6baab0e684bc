"""Re-export of :mod:`attn_core.triton_env` for modules that imported it from here (the kernels)."""

from attn_core.triton_env import compiled_triton_available, interpret_mode, triton_installed

__all__ = ["compiled_triton_available", "interpret_mode", "triton_installed"]
