"""torch.compile traces the public API whole: no graph breaks (fullgraph=True raises on one), the
sdpa backend runs as custom ops, and compiled outputs and gradients equal eager ones."""

from __future__ import annotations

import pytest
import torch

import attn_core
from attn_core.api import dilated_attention


def _graphs_backend(graphs: list[str]):
    """An aot_eager backend (AOTAutograd traces the custom ops' autograd) that records each graph."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(str(gm.graph))
        return gm.forward

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _inputs(B, N, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g).requires_grad_() for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(is_causal=True, head_mode="split"),
        dict(is_causal=True, key_padding_mask="tail"),
    ],
    ids=["plain", "causal-split", "causal-padded"],
)
def test_dilated_attention_compiles_whole(kwargs: dict) -> None:
    torch._dynamo.reset()
    q, k, v = _inputs(2, 50, 6, 3, 8)  # odd N (short last segments), GQA 2:1
    if kwargs.get("key_padding_mask") == "tail":
        mask = torch.zeros(2, 50, dtype=torch.bool)
        mask[1, 41:] = True
        kwargs = {**kwargs, "key_padding_mask": mask}

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(q, k, v, [8, 16], [1, 4], backend="sdpa", **kwargs)

    graphs: list[str] = []
    compiled = torch.compile(fn, backend=_graphs_backend(graphs), fullgraph=True)
    got = compiled(q, k, v)
    want = fn(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dout = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (q, k, v), dout)
    g_want = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any("attn_core.dilated_sdpa_fwd" in g for g in graphs)
    assert any("attn_core.dilated_sdpa_bwd" in g for g in graphs)  # the backward graph


def test_longnet_modules_compile_without_graph_breaks() -> None:
    torch._dynamo.reset()
    mha = attn_core.MultiheadDilatedAttention(32, 4, [16, 32], [1, 2])
    x = torch.randn(2, 64, 32, requires_grad=True)
    compiled = torch.compile(lambda x: mha(x, x, x)[0], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mha(x, x, x)[0])

    torch._dynamo.reset()
    lm = attn_core.LongNetLM(100, 32, 2, 2, [16, 32], [1, 2]).eval()
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(3))
    compiled_lm = torch.compile(lm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled_lm(ids), lm(ids))


def test_first_call_inside_compile_and_last_backend() -> None:
    # the backends are imported with the api (a compiled region cannot import them), and a
    # compiled call still records the backend it ran
    from attn_core import api

    assert all(api.REGISTRY.load(name) is not None for name in api.BACKENDS)
    torch._dynamo.reset()
    q, k, v = _inputs(1, 32, 2, 2, 8, seed=4)
    compiled = torch.compile(
        lambda q, k, v: dilated_attention(q, k, v, [16], [2], backend="reference"), backend="eager", fullgraph=True
    )
    compiled(q, k, v)
    assert api.last_backend() == "reference"


def test_device_reasons_are_a_trace_time_constant_without_importing_dynamo() -> None:
    # the mark on sdpa_ops._cudnn_reasons_of is the one torch.compiler.assume_constant_result sets
    import subprocess
    import sys

    from attn_core import sdpa_ops

    def probe(idx: int) -> tuple[str, ...]:
        return ()

    marked = torch.compiler.assume_constant_result(probe)
    flags = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert flags and all(getattr(sdpa_ops._cudnn_reasons_of, k, None) == v for k, v in flags.items())
    # ...set without importing torch._dynamo: importing the packages stays light
    code = "import sys, attn_core, attn_core.api; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
