"""The strided-rows kernels compile ahead of time for an H100 (sm_90) with the launch constants of
:mod:`attn_core.strided_varlen`, on any machine: Triton's compiler and its bundled ptxas need no
GPU. This catches what the interpreter cannot: layouts, wgmma lowering, shared memory.

The compile runs in a child process without TRITON_INTERPRET (under it, ``triton.jit`` makes
interpreted functions, which do not compile); this file is that child's script.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 232448  # opt-in shared memory per block
# argument name -> type, for the kernels' pointer and float arguments (others are i32)
TYPES = {
    **dict.fromkeys(("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), "*bf16"),
    **dict.fromkeys(("LSE", "DELTA"), "*fp32"),
    **dict.fromkeys(("TILE_SEQ", "TILE_M0", "LEN", "QH0", "KH0"), "*i32"),
    "START": "*i64",
    "KPAD": "*u8",
    "qk_scale": "fp32",
    "sm_scale": "fp32",
}


def _compile_all(causal: bool) -> list[dict]:
    """Compile the three kernels at D=128 with padding (the largest variant) for sm_90; one record each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attn_core import strided_kernels
    from attn_core import strided_varlen as sv

    common = dict(D=128, BLOCK_D=128, IS_CAUSAL=causal, HAS_PAD=True)
    # warps as strided_varlen launches D=128: 8 forward (128 query rows), 4 backward
    jobs = [
        (strided_kernels.fwd_kernel, dict(common, BLOCK_M=sv.FWD_BLOCK_M, BLOCK_N=sv.FWD_BLOCK_N, FIRST=False), 8,
         sv.FWD_STAGES),
        (strided_kernels.dkdv_kernel, dict(common, BLOCK_M=sv.BWD_STEP, BLOCK_N=sv.BWD_BLOCK), 4, sv.BWD_STAGES),
        (strided_kernels.dq_kernel, dict(common, BLOCK_M=sv.BWD_BLOCK, BLOCK_N=sv.BWD_STEP), 4, sv.BWD_STAGES),
    ]  # fmt: skip
    records = []
    for kernel, constexprs, warps, stages in jobs:
        names = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constexprs else TYPES.get(n, "i32") for n in names}
        built = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=warps, num_stages=stages),
        )
        records.append(
            dict(
                kernel=kernel.fn.__name__,
                cubin_bytes=len(built.asm["cubin"]),
                wgmma="wgmma" in built.asm["ptx"],
                shared=built.metadata.shared,
            )
        )
    return records


def _can_compile() -> str | None:
    """Why this machine cannot compile for NVIDIA targets (None: it can)."""
    try:
        import triton.backends.nvidia as nvidia_backend
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return "triton with its NVIDIA backend is not installed"
    if not os.path.exists(os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")):
        return "Triton's bundled ptxas is missing"
    return None


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_compile_for_h100(causal):
    reason = _can_compile()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__, str(int(causal))], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in records] == ["fwd_kernel", "dkdv_kernel", "dq_kernel"]
    for r in records:
        assert r["cubin_bytes"] > 0, r
        assert r["wgmma"], f"{r['kernel']}: the matmuls did not lower to Hopper's wgmma"
        assert 0 < r["shared"] <= H100_SHARED_BYTES, r


if __name__ == "__main__":
    print(json.dumps(_compile_all(bool(int(sys.argv[1])))))
