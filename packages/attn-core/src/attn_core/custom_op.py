"""Differentiable kernels as ``torch.library`` custom ops, written once: :class:`DifferentiableOp`.

A kernel with a hand-written backward (the sdpa backend's dilated attention, attn_sparse's
block-sparse kernels) is defined by

- ``forward(*inputs, *args) -> (out, *aux)``: the implementation. ``inputs`` are the tensors that
  get gradients; ``args`` are whatever else it takes, as Python objects (configs, a layout's CSR);
- ``backward(grad_out, *inputs, out, *aux, *args) -> (grad of each input)``: only the first output
  gets a gradient, the others (an LSE) exist to be saved for the backward. The saved-tensor rule
  is fixed: the backward gets every input and every forward output, and the same ``args``;
- ``encode(*args) -> op_args`` / ``decode(*op_args) -> args``: ``args`` as values an op schema
  can hold (``args_schema``, e.g. ``"Tensor? mask, int[] segment_lengths, float scale"``) and back;
- ``fake(*inputs, *op_args) -> (out, *aux)``: empty tensors of the outputs' shapes (tracing).

From these it registers the op pair ``<name>_fwd`` / ``<name>_bwd`` (``<name>_bwd`` takes
``(grad, *inputs, *outputs, *op_args)``), their fakes (the backward's: empty gradients shaped like
the inputs) and the autograd formula of ``<name>_fwd`` (``register_autograd``), and gives the one
function callers use: :meth:`DifferentiableOp.__call__` returns ``out``.

Under torch.compile a call is the op pair: the compiler traces ``encode`` and the ops (opaque, their
fakes give shapes), and AOTAutograd takes the backward from the registered formula. Eager calls run
the same ``forward`` and ``backward`` through a plain ``torch.autograd.Function`` with the ``args``
as they are: the dispatcher's custom-op path costs ~0.1-0.3 ms of host time per forward+backward
(tools/bench_op_host.py), more than a whole host-bound step can give, and the objects carry per-call
caches (a layout's launch tables) that ``decode`` would have to look up again. Both paths run the
same two functions on the same values. Double backward (``create_graph=True``, then differentiating
the gradients) raises ``second_order_error``: the kernels' backward has no derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .first_order import first_order_only

__all__ = ["DifferentiableOp"]


class DifferentiableOp:
    """A forward/backward kernel pair as one differentiable function; see the module docstring.

    name: ``"namespace::op"``; the ops are ``namespace::op_fwd`` and ``namespace::op_bwd``.
    inputs / outputs: names of the differentiable tensor inputs and of the forward's outputs (the
    first is what a call returns). tags: torch.Tag of both ops (e.g. ``cudagraph_unsafe``).
    """

    def __init__(
        self,
        name: str,
        *,
        inputs: Sequence[str],
        outputs: Sequence[str],
        args_schema: str,
        forward: Callable[..., tuple[torch.Tensor, ...]],
        backward: Callable[..., tuple[torch.Tensor, ...]],
        encode: Callable[..., tuple[Any, ...]],
        decode: Callable[..., tuple[Any, ...]],
        fake: Callable[..., tuple[torch.Tensor, ...]],
        second_order_error: str,
        tags: Sequence[torch.Tag] = (),
    ) -> None:
        if len(inputs) == 0 or len(outputs) == 0:
            raise ValueError(f"{name}: needs at least one input and one output, got {inputs!r} and {outputs!r}")
        self.name = name
        self.num_inputs = len(inputs)
        self.num_outputs = len(outputs)
        self.forward = forward
        self.backward = backward
        self.encode = encode
        self.decode = decode
        self.second_order_error = second_order_error

        def returns(n: int) -> str:
            return "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"

        tensors_in = ", ".join(f"Tensor {n}" for n in inputs)
        tensors_out = ", ".join(f"Tensor {n}" for n in outputs)
        fwd_schema = f"({tensors_in}, {args_schema}) -> {returns(len(outputs))}"
        bwd_schema = f"(Tensor grad_{outputs[0]}, {tensors_in}, {tensors_out}, {args_schema}) -> {returns(len(inputs))}"
        tag_list = list(tags)
        self.forward_op = torch.library.custom_op(
            f"{name}_fwd", self._forward_op_impl, mutates_args=(), schema=fwd_schema, tags=tag_list
        )
        self.forward_op.register_fake(lambda *a: self._op_outputs(fake(*a)))
        self.backward_op = torch.library.custom_op(
            f"{name}_bwd", self._backward_op_impl, mutates_args=(), schema=bwd_schema, tags=tag_list
        )
        self.backward_op.register_fake(self._backward_fake)
        torch.library.register_autograd(
            self.forward_op, self._op_backward, setup_context=self._op_setup_context
        )  # fmt: skip

    def __call__(self, *inputs_and_args: Any) -> torch.Tensor:
        """out of ``forward(*inputs, *args)``, differentiable in the inputs."""
        if torch.compiler.is_compiling():
            n = self.num_inputs
            outputs = self.forward_op(*inputs_and_args[:n], *self.encode(*inputs_and_args[n:]))
            out: torch.Tensor = outputs[0] if self.num_outputs > 1 else outputs
            return out
        result: torch.Tensor = _EagerFunction.apply(self, *inputs_and_args)
        return result

    # ---- the ops' implementations and autograd formula (what torch.compile runs)
    def _forward_op_impl(self, *inputs_and_op_args: Any) -> Any:
        n = self.num_inputs
        return self._op_outputs(self.forward(*inputs_and_op_args[:n], *self.decode(*inputs_and_op_args[n:])))

    def _op_outputs(self, outputs: tuple[torch.Tensor, ...]) -> Any:
        # a schema with one return gives a tensor, not a 1-tuple
        return outputs if self.num_outputs > 1 else outputs[0]

    def _backward_op_impl(self, grad: torch.Tensor, *saved_and_op_args: Any) -> Any:
        k = self.num_inputs + self.num_outputs
        grads = self.backward(grad, *saved_and_op_args[:k], *self.decode(*saved_and_op_args[k:]))
        return grads if self.num_inputs > 1 else grads[0]

    def _backward_fake(self, grad: torch.Tensor, *saved_and_op_args: Any) -> Any:
        grads = tuple(
            torch.empty_like(t, memory_format=torch.contiguous_format) for t in saved_and_op_args[: self.num_inputs]
        )
        return grads if self.num_inputs > 1 else grads[0]

    def _op_setup_context(self, ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        n = self.num_inputs
        outputs = output if self.num_outputs > 1 else (output,)
        _save(ctx, (*inputs[:n], *outputs), inputs[n:])

    def _op_backward(self, ctx: Any, grad: torch.Tensor, *aux_grads: Any) -> tuple[torch.Tensor | None, ...]:
        # the auxiliary outputs are not exposed: their incoming gradients are ignored
        saved, op_args = _saved(ctx)
        grads = self.backward_op(grad, *saved, *op_args)
        grads = grads if self.num_inputs > 1 else (grads,)
        return (*grads, *(None,) * len(op_args))


def _save(ctx: Any, tensors: tuple[torch.Tensor, ...], args: tuple[Any, ...]) -> None:
    """Keep the inputs and outputs, and the args, for the backward; tensors among the args are
    saved too (save_for_backward checks that nothing modified them in place)."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*tensors, *(args[i] for i in positions))
    ctx.num_saved, ctx.arg_tensor_positions = len(tensors), positions
    ctx.args = args if not positions else tuple(None if i in positions else a for i, a in enumerate(args))


def _saved(ctx: Any) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """(inputs and outputs, args) as :func:`_save` kept them."""
    saved = ctx.saved_tensors
    if not ctx.arg_tensor_positions:
        return saved, ctx.args
    args = list(ctx.args)
    for i, t in zip(ctx.arg_tensor_positions, saved[ctx.num_saved :]):
        args[i] = t
    return saved[: ctx.num_saved], tuple(args)


class _EagerFunction(torch.autograd.Function):
    """Eager calls of a :class:`DifferentiableOp`: its forward and backward with the args as they are."""

    @staticmethod
    def forward(ctx: Any, op: DifferentiableOp, *inputs_and_args: Any) -> torch.Tensor:  # type: ignore[override]
        n = op.num_inputs
        outputs = op.forward(*inputs_and_args)
        _save(ctx, (*inputs_and_args[:n], *outputs), inputs_and_args[n:])
        ctx.op = op
        return outputs[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        op: DifferentiableOp = ctx.op
        saved, args = _saved(ctx)
        with torch.no_grad():  # the kernels' backward has no derivative of its own
            grads = op.backward(grad, *saved, *args)
        # create_graph=True: the gradients join a graph in which differentiating them raises
        guarded = first_order_only(grads, (grad, *saved[: op.num_inputs]), op.second_order_error)
        return (None, *guarded, *(None,) * len(args))
