"""The strided-rows kernels compile ahead of time for an H100 (sm_90) with the launch constants of
:mod:`attn_core.strided_varlen`, on any machine (:mod:`attn_core.compile_check`): they lower to
Hopper's wgmma and fit its shared memory, which the interpreter cannot check. The forward compiles
with its K/V tiles through TMA descriptors and with pointer loads only."""

from __future__ import annotations

import pytest

from attn_core import strided_varlen as sv
from attn_core.compile_check import H100_SHARED_BYTES, compile_for_sm90, sm90_compile_unavailable

# Triton types of the kernels' pointer and float arguments (the others are i32)
TYPES = {
    **dict.fromkeys(("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), "*bf16"),
    **dict.fromkeys(("LSE", "DELTA"), "*fp32"),
    **dict.fromkeys(("TILE_SEQ", "TILE_M0", "LEN", "QH0", "KH0"), "*i32"),
    "START": "*i64",
    "KPAD": "*u8",
    "qk_scale": "fp32",
    "sm_scale": "fp32",
}
# the forward's K/V descriptors as strided_varlen makes them at D=128: blocks (BLOCK_N, 1, 1, BLOCK_D)
DESCRIPTOR = f"tensordesc<bf16[{sv.FWD_BLOCK_N}, 1, 1, 128]>"


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_compile_for_h100(causal):
    reason = sm90_compile_unavailable()
    if reason:
        pytest.skip(reason)
    common = dict(D=128, BLOCK_D=128, IS_CAUSAL=causal, HAS_PAD=True)  # the largest variant
    # warps as strided_varlen launches D=128: 8 forward (128 query rows), 4 backward
    fwd = dict(common, BLOCK_M=sv.FWD_BLOCK_M, BLOCK_N=sv.FWD_BLOCK_N, FIRST=False)
    pointers = {**TYPES, "KD": "*bf16", "VD": "*bf16"}
    jobs = [
        ("fwd_kernel", dict(fwd, TMA=True), {**TYPES, "KD": DESCRIPTOR, "VD": DESCRIPTOR}, 8, sv.FWD_STAGES),
        ("fwd_kernel", dict(fwd, TMA=False), pointers, 8, sv.FWD_STAGES),
        ("dkdv_kernel", dict(common, BLOCK_M=sv.BWD_STEP, BLOCK_N=sv.BWD_BLOCK), TYPES, 4, sv.BWD_STAGES),
        ("dq_kernel", dict(common, BLOCK_M=sv.BWD_BLOCK, BLOCK_N=sv.BWD_STEP), TYPES, 4, sv.BWD_STAGES),
    ]
    for name, constexprs, types, warps, stages in jobs:
        built = compile_for_sm90(f"attn_core.strided_kernels:{name}", constexprs, types, warps, stages)
        assert built["cubin_bytes"] > 0, (name, built)
        assert built["wgmma"], f"{name}: the matmuls did not lower to Hopper's wgmma"
        assert built["tma"] == bool(constexprs.get("TMA")), f"{name}: TMA loads {built['tma']}, {constexprs}"
        assert 0 < built["shared"] <= H100_SHARED_BYTES, (name, built)


def test_a_failed_compile_raises_with_the_reason():
    if sm90_compile_unavailable():
        pytest.skip(sm90_compile_unavailable())
    with pytest.raises(RuntimeError, match="fwd_kernel"):
        compile_for_sm90("attn_core.strided_kernels:fwd_kernel", dict(D=128), TYPES, 4, 2)  # constexprs missing
