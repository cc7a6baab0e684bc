"""attn_core.custom_op.DifferentiableOp: one definition gives an op pair that opcheck accepts, eager
and compiled calls of the same forward/backward (equal outputs and gradients, float64-checked), and
a clear error for double backward. Exercised on a small softmax attention with a hand-written
backward and a saved LSE, an optional tensor argument and a Python-object argument."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from attn_core.backends import sdpa
from attn_core.custom_op import DifferentiableOp


@dataclass(frozen=True)
class _Scale:
    """A Python object the ops cannot take: travels as a float."""

    value: float


def _forward(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: _Scale
) -> tuple[torch.Tensor, torch.Tensor]:
    # out = softmax(q k^T * scale + bias) k, lse = logsumexp of the logits; q (N, D), k (M, D)
    logits = q @ k.T * scale.value + (0 if bias is None else bias)
    lse = logits.logsumexp(-1)
    return (logits - lse[:, None]).exp() @ k, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: _Scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = q @ k.T * scale.value + (0 if bias is None else bias)
    p = (logits - lse[:, None]).exp()
    dp = dout @ k.T
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * scale.value
    return ds @ k, ds.T @ q + p.T @ dout


def _fake(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(q), q.new_empty(q.shape[0])


def _second_order(name: str) -> str:
    return f"double backward is not supported by {name}"


OP = DifferentiableOp(
    "attn_core_test::softmax_attend",
    inputs=("q", "k"),
    outputs=("out", "lse"),
    args_schema="Tensor? bias, float scale",
    forward=_forward,
    backward=_backward,
    encode=lambda bias, scale: (bias, scale.value),
    decode=lambda bias, scale: (bias, _Scale(scale)),
    fake=_fake,
    second_order_error=_second_order("softmax_attend"),
)


def _inputs(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(5, 4, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    bias = torch.randn(5, 5, generator=g, dtype=dtype)
    return q, k, bias


def _autograd(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    logits = q @ k.T * scale + (0 if bias is None else bias)
    return logits.softmax(-1) @ k


@pytest.mark.parametrize("with_bias", [True, False])
def test_eager_calls_match_plain_autograd_in_float64(with_bias: bool) -> None:
    q, k, bias = _inputs(1, torch.float64)
    b = bias if with_bias else None
    out = OP(q, k, b, _Scale(0.7))
    want = _autograd(q, k, b, 0.7)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k), dout), torch.autograd.grad(want, (q, k), dout)):
        torch.testing.assert_close(a, w)


def test_compiled_calls_run_the_ops_and_match_eager() -> None:
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    q, k, bias = _inputs(2)

    def fn(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return OP(q, k, bias, _Scale(0.5)) * 2

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    got = torch.compile(fn, backend=backend, fullgraph=True)(q, k, bias)
    want = fn(q, k, bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dout = torch.randn_like(want)
    for a, w in zip(torch.autograd.grad(got, (q, k), dout), torch.autograd.grad(want, (q, k), dout)):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    assert any("attn_core_test.softmax_attend_fwd" in g for g in graphs)
    assert any("attn_core_test.softmax_attend_bwd" in g for g in graphs)


def test_ops_pass_opcheck() -> None:
    # schema, fakes, autograd registration and AOT dispatch of the generated op pair
    q, k, bias = _inputs(3)
    torch.library.opcheck(OP.forward_op, (q, k, bias, 0.5))
    torch.library.opcheck(OP.forward_op, (q, k, None, 0.5))
    out, lse = OP.forward_op(q.detach(), k.detach(), bias, 0.5)
    torch.library.opcheck(OP.backward_op, (torch.randn_like(out), q.detach(), k.detach(), out, lse, bias, 0.5))


def test_sdpa_ops_pass_opcheck() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 12, 2, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 12, 1, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 10:] = True
    torch.library.opcheck(sdpa.DILATED_SDPA.forward_op, (q, k, v, mask, None, [4, 8], [1, 2], "all", True, 0.3))
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    torch.library.opcheck(sdpa.DILATED_SDPA.forward_op, (q, k, v, mask, cu, [4, 8], [1, 2], "split", False, 0.3))


def test_double_backward_raises_the_op_error_and_first_order_is_unchanged() -> None:
    q, k, bias = _inputs(5)
    dq, dk = torch.autograd.grad(OP(q, k, bias, _Scale(0.5)).square().sum(), (q, k), create_graph=True)
    dq1, dk1 = torch.autograd.grad(OP(q, k, bias, _Scale(0.5)).square().sum(), (q, k))
    assert torch.equal(dq.detach(), dq1) and torch.equal(dk.detach(), dk1)
    with pytest.raises(RuntimeError, match="double backward is not supported by softmax_attend"):
        (dq.square().sum() + dk.sum()).backward()


def test_one_input_one_output_ops() -> None:
    def forward(x: torch.Tensor, power: int) -> tuple[torch.Tensor]:
        return (x**power,)

    def backward(dout: torch.Tensor, x: torch.Tensor, out: torch.Tensor, power: int) -> tuple[torch.Tensor]:
        return (dout * power * x ** (power - 1),)

    op = DifferentiableOp(
        "attn_core_test::power",
        inputs=("x",),
        outputs=("out",),
        args_schema="int power",
        forward=forward,
        backward=backward,
        encode=lambda power: (power,),
        decode=lambda power: (power,),
        fake=lambda x, power: (torch.empty_like(x),),
        second_order_error=_second_order("power"),
    )
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    torch.testing.assert_close(op(x, 3), x**3)
    (g,) = torch.autograd.grad(op(x, 3).sum(), (x,))
    torch.testing.assert_close(g, 3 * x.detach() ** 2)
    torch.library.opcheck(op.forward_op, (x, 3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: op(x, 3), backend="aot_eager", fullgraph=True)
    (gc,) = torch.autograd.grad(compiled(x).sum(), (x,))
    torch.testing.assert_close(gc, g, rtol=0, atol=0)


def test_an_op_needs_inputs_and_outputs() -> None:
    kwargs: dict[str, Any] = dict(
        args_schema="int n",
        forward=_forward,
        backward=_backward,
        encode=lambda n: (n,),
        decode=lambda n: (n,),
        fake=_fake,
        second_order_error="",
    )
    with pytest.raises(ValueError, match="at least one input and one output"):
        DifferentiableOp("attn_core_test::nothing_in", inputs=(), outputs=("out",), **kwargs)
    with pytest.raises(ValueError, match="at least one input and one output"):
        DifferentiableOp("attn_core_test::nothing_out", inputs=("x",), outputs=(), **kwargs)


@pytest.mark.parametrize("path", ["eager", "op"])
def test_tensor_args_are_saved_for_the_backward(path: str) -> None:
    # a tensor among the args (the bias) is saved like the inputs: modifying it in place between
    # forward and backward raises instead of giving gradients of another function
    q, k, bias = _inputs(7)
    if path == "eager":
        out = OP(q, k, bias, _Scale(0.5))
    else:
        out = OP.forward_op(q, k, bias, 0.5)[0]
    bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
