"""The hostile-input guarantees on the CUDA paths (cuDNN through the sdpa backend, the fused merge).

Skipped without a GPU; `bash tools/gpu_tests.sh` runs them. The CPU versions live in
test_hostile_inputs.py: these repeat the ones whose code differs on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from attn_core import dilated_attention, reference
from attn_core.testing import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEG, RATES = [64, 128], [1, 2]


def _leaves(dtype: torch.dtype, seed: int, B: int = 2, N: int = 300, H: int = 4, Hkv: int = 2, D: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv)]


def _run_reference(q, k, v, mask, causal, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, _ = reference.dilated_attention(*leaves, SEG, RATES, is_causal=causal, key_padding_mask=mask, dtype=dtype)
    return out, torch.autograd.grad(out, leaves, dout.to(out.device, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_padded_keys_values_are_never_read_by_cudnn(dtype, causal, fill) -> None:
    q, k, v = _leaves(dtype, seed=21)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, 50:170] = True
    mask[1, ::3] = True
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[mask], v_bad[mask] = fill, fill
    args = [t.cuda().to(dtype).requires_grad_() for t in (q, k_bad, v_bad)]
    m = mask.cuda()
    out = dilated_attention(*args, SEG, RATES, is_causal=causal, key_padding_mask=m, backend="sdpa")
    grads = torch.autograd.grad(out, args, dout.cuda().to(dtype))
    ref_out, ref_grads = _run_reference(q, k, v, mask, causal, dout, torch.float64)
    base_out, base_grads = _run_reference(q.cuda(), k.cuda(), v.cuda(), m, causal, dout, dtype)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_to_reference("out", out, ref_out, base_out)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_close_to_reference(name, g, r, b)
    assert torch.all(grads[1][m] == 0) and torch.all(grads[2][m] == 0)


@pytest.mark.parametrize(("dtype", "value"), [(torch.float16, 60000.0), (torch.bfloat16, 1e18)])
def test_large_logits_stay_normalised_on_cuda(dtype, value) -> None:
    # q.k = value**2 * D must stay inside fp32 (cuDNN accumulates there): 1e18**2 * 64 = 6.4e37
    q = torch.full((2, 256, 4, 64), value, dtype=dtype, device="cuda")
    k = torch.full((2, 256, 2, 64), value, dtype=dtype, device="cuda")
    v = torch.ones(2, 256, 2, 64, dtype=dtype, device="cuda")
    for causal in (False, True):
        out = dilated_attention(q, k, v, SEG, RATES, is_causal=causal, backend="sdpa")
        err = float((out.double() - 1).abs().max())
        assert err <= 4 * torch.finfo(dtype).eps, f"{dtype} causal={causal}: max |out - 1| = {err:.3e}"


def test_double_backward_is_refused_clearly_on_cuda() -> None:
    q, k, v = (t.cuda().to(torch.bfloat16).requires_grad_() for t in _leaves(torch.bfloat16, seed=23))
    out = dilated_attention(q, k, v, SEG, RATES, backend="sdpa")
    (dq,) = torch.autograd.grad(out.float().square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .*not supported by the sdpa backend"):
        dq.float().sum().backward()
