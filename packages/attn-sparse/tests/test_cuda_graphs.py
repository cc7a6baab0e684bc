"""CUDA graphs on a GPU: torch.compile(mode="reduce-overhead") and a manual torch.cuda.graph
capture of the eager path give the eager results, step after step with fresh inputs.

GPU only (skipped in CI and under TRITON_INTERPRET=1); run on the GPU machines with
``python -m pytest packages/attn-sparse/tests/test_cuda_graphs.py``.
"""

from __future__ import annotations

import pytest
import torch

from attn_core.triton_env import interpret_mode, triton_installed
from attn_sparse import BlockSparseAttention, patterns

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or interpret_mode() or not triton_installed(),
    reason="needs a CUDA GPU and Triton, not the interpreter",
)

N, H, HKV, D = 1000, 4, 2, 64  # partial last block, GQA


def _module() -> BlockSparseAttention:
    layout = patterns.bigbird(N, 128, 128, 2, seed=3, block_size=(128, 128), device="cuda")
    return BlockSparseAttention(layout, backend="triton")


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, N, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(2, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do)


def _step(module: BlockSparseAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor):  # type: ignore[no-untyped-def]
    out = module(q, k, v, is_causal=True)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def test_reduce_overhead_compile_matches_eager() -> None:
    module = _module()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: _step(module, *x), mode="reduce-overhead")
    for seed in range(4):  # warm-up, recording, then replays
        x = _inputs(seed)
        want = _step(module, *x)
        got = [t.clone() for t in compiled(*x)]
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert not a.isnan().any(), name
            assert torch.equal(a, b), (seed, name)


def test_manual_cuda_graph_capture_of_the_eager_path() -> None:
    # warm up on a side stream (builds the layout's launch tables), capture, then replay with new
    # values copied into the captured inputs
    module = _module()
    static = _inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(module, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(module, *static)
    for seed in range(1, 4):
        x = _inputs(seed)
        with torch.no_grad():
            for dst, src in zip(static, x):
                dst.copy_(src)
        graph.replay()
        want = _step(module, *x)
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, want):
            assert torch.equal(a, b), (seed, name)
