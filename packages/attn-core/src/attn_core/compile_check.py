"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) on any machine, for tests.

Triton's compiler and its bundled ptxas need no GPU, so CI can check what the interpreter cannot:
that a kernel lowers (layouts, Hopper's wgmma) and fits a device's shared memory. The compile runs
in a child process without TRITON_INTERPRET: under it, ``triton.jit`` makes interpreted functions,
which do not compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["H100_SHARED_BYTES", "compile_for_sm90", "sm90_compile_unavailable"]

H100_SHARED_BYTES = 232448  # opt-in shared memory per block on an H100 / H200

_CHILD = """
import importlib, inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
module, name = spec["kernel"].split(":")
kernel = getattr(importlib.import_module(module), name)
constexprs = spec["constexprs"]
signature = {n: "constexpr" if n in constexprs else spec["types"].get(n, "i32") for n in inspect.signature(kernel.fn).parameters}
built = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
ptx = built.asm["ptx"]
print(json.dumps(dict(cubin_bytes=len(built.asm["cubin"]), wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                      shared=built.metadata.shared)))
"""


def sm90_compile_unavailable() -> str | None:
    """Why this machine cannot compile Triton kernels for sm_90 (None: it can)."""
    try:
        import triton.backends.nvidia as nvidia_backend
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return "triton with its NVIDIA backend is not installed"
    if not os.path.exists(os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")):
        return "Triton's bundled ptxas is missing"
    return None


def compile_for_sm90(
    kernel: str, constexprs: dict[str, Any], types: dict[str, str], num_warps: int, num_stages: int
) -> dict[str, Any]:
    """Compile ``kernel`` ("module:name" of a ``triton.jit`` function) for sm_90 in a child process.

    constexprs: the constexpr arguments' values; types: Triton types of the other arguments by
    name ("*bf16", "*i32", "fp32", "tensordesc<bf16[64, 128]>", ...; unnamed ones are "i32").
    Returns cubin_bytes, wgmma (the PTX uses Hopper's wgmma), tma (it loads through TMA: bulk
    tensor copies) and shared (bytes of shared memory per program). Raises RuntimeError
    with the child's error output when the compile fails.
    """
    spec = json.dumps(
        dict(kernel=kernel, constexprs=constexprs, types=types, num_warps=num_warps, num_stages=num_stages)
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, spec], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if run.returncode != 0:
        raise RuntimeError(f"compiling {kernel} for sm_90 failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
