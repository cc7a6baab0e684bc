"""Custom autograd Functions without a derivative of their backward: a clear error on double backward.

Fused kernels and communication have no derivative of their own backward. Without a guard,
``create_graph=True`` followed by a second backward either reaches torch's raw error or, worse,
differentiates part of the backward's math and returns a wrong second-order gradient.
:func:`first_order_only` passes the first-order gradients through and puts a node in the graph
that raises the caller's message if anything differentiates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["first_order_only", "second_order_error"]


def second_order_error(what: str, alternative: str) -> str:
    """The message for ``what`` (e.g. "ring attention"); ``alternative`` says what supports it instead."""
    return (
        f"double backward (second-order gradients through create_graph=True) is not supported by {what}: "
        f"its backward has no derivative of its own; {alternative}"
    )


class _RaiseOnBackward(torch.autograd.Function):
    """Returns its first ``count`` tensors; differentiating them raises RuntimeError(message)."""

    @staticmethod
    def forward(ctx: Any, message: str, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.message = message
        return tuple(tensors[:count])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        raise RuntimeError(ctx.message)


def first_order_only(
    grads: Sequence[torch.Tensor | None], depends_on: Sequence[torch.Tensor], message: str
) -> tuple[torch.Tensor | None, ...]:
    """``grads`` unchanged; when a backward builds a graph (create_graph=True) differentiating them raises.

    Call from a custom Function's backward with the gradients computed under ``torch.no_grad()``
    and the tensors they depend on (the incoming gradient and the saved inputs): those put the
    result in the graph, so a second-order backward reaches the raising node.
    """
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in depends_on)):
        return tuple(grads)
    present = [g for g in grads if g is not None]
    guarded = iter(_RaiseOnBackward.apply(message, len(present), *present, *depends_on))
    return tuple(None if g is None else next(guarded) for g in grads)
