"""The block-sparse forward kernel compiles ahead of time for an H100 (sm_90) with its default
config for 128x128 layout blocks at D=128, on any machine (:mod:`attn_core.compile_check`): it
lowers to Hopper's wgmma and fits its shared memory, which the interpreter cannot check. (The
descriptor-loading variant, TMA=True, takes tensor-descriptor arguments and is left to the GPU
tests.)"""

from __future__ import annotations

import pytest

from attn_core.compile_check import H100_SHARED_BYTES, compile_for_sm90, sm90_compile_unavailable
from attn_sparse.kernels.planning import default_config

TYPES = {
    **dict.fromkeys(("Q", "K", "V", "O"), "*bf16"),
    "LSE": "*fp32",
    **dict.fromkeys(("COL", "TABLE", "DOCS"), "*i32"),
    "qk_scale": "fp32",
}


@pytest.mark.parametrize("banded", [False, True])
def test_forward_kernel_compiles_for_h100(banded):
    reason = sm90_compile_unavailable()
    if reason:
        pytest.skip(reason)
    cfg = default_config((128, 128), head_dim=128, banded=banded)
    constexprs = dict(
        HEAD_DIM=128, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, LAYOUT_BQ=128, LAYOUT_BK=128,
        BANDED=banded, HAS_DOCS=True, TMA=False,
    )  # fmt: skip
    built = compile_for_sm90("attn_sparse.kernels.forward:fwd_kernel", constexprs, TYPES, cfg.fwd_warps, cfg.fwd_stages)
    assert built["cubin_bytes"] > 0 and built["wgmma"], built
    assert 0 < built["shared"] <= H100_SHARED_BYTES, built
