"""CUDA graphs on a GPU: dilated attention's sdpa backend (forward and backward) captured with
torch.cuda.graph replays the eager results with fresh inputs copied into the captured ones.

Short sequences are host-bound (one fused attention call per group and offset); capturing the
step removes the host's issue time, so the backend must stay capture-safe: no host reads of device
values, no allocation whose size depends on values. GPU only (skipped in CI); run on the GPU
machines with ``python -m pytest packages/attn-core/tests/test_cuda_graphs_dilated.py``.
"""

from __future__ import annotations

import pytest
import torch

from attn_core import dilated_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N, H, HKV, D = 4096, 8, 2, 64
SEGMENTS, RATES = [512, 1024, 2048], [1, 2, 4]


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, N, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do)


@pytest.mark.parametrize("head_mode", ["all", "split"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_captured_step_replays_the_eager_results(head_mode: str, is_causal: bool) -> None:
    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=is_causal, head_mode=head_mode, backend="sdpa")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    static = _inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for seed in range(1, 4):
        x = _inputs(seed)
        with torch.no_grad():
            for dst, src in zip(static, x):
                dst.copy_(src)
        graph.replay()
        want = step(*x)
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, want):
            assert not a.isnan().any(), name
            if name == "out":
                assert torch.equal(a, b), (seed, name)
            else:
                # cuDNN's backward accumulates dq with atomics, so two runs differ in the last bits;
                # replaying stale inputs or buffers would differ by O(1) relative
                rel = (a.float() - b.float()).abs().max() / b.float().abs().max()
                assert rel < 2e-2, (seed, name, rel.item())
