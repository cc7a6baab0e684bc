"""Sequence parallelism for HF models registered with the "ring" / "ring_dilated" kinds.

Every rank of the group holds the same full batch; each runs the model on its own shard of every
sequence, and the ring kernels make each shard's attention see the whole sequence:

    name = hf.register("ring", group=group)                       # layout "zigzag"
    model.set_attn_implementation(name)
    batch = hf.shard_batch(input_ids, labels, group=group)         # layout must match register()
    out = model(**batch)
    out.loss.backward()                 # this rank's share of the global mean loss
    hf.sync_gradients(model, group)     # sum the shares: every rank now holds the full gradient
    loss = hf.reduce_loss(out.loss, group)
    logits = hf.gather_logits(out.logits, group=group)   # (B, N, V), for evaluation

"ring_dilated" shards contiguously: pass layout="contiguous" to :func:`shard_batch` and
:func:`gather_logits`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["gather_logits", "reduce_loss", "shard_batch", "sync_gradients"]


def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_2d(name: str, x: object, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d (B, N) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have the shape of input_ids {shape}, got {tuple(x.shape)}")
    return x


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's shard of a (B, N) batch, as keyword arguments for the model's forward.

    input_ids, labels, position_ids, attention_mask: (B, N), the same full batch on every rank
    (position_ids default to 0..N-1; attention_mask to all ones). N must split over the group:
    N % W == 0 for "contiguous", N % (2W) == 0 for "zigzag". Returns input_ids, position_ids (the
    shard's global positions, so rotary embeddings see the true positions) and attention_mask,
    each (B, N / W). An attention_mask is always given so transformers does not read the zigzag
    shard's jumping position_ids as packed sequences.

    With labels: they are shifted on the full sequence first (token t predicts t + 1, the last
    gets ``ignore_index``) and sharded as ``labels`` and ``shift_labels``, and
    ``num_items_in_batch`` counts the labelled tokens of the whole batch, so each rank's loss is its
    share of the global mean (their sum; see :func:`reduce_loss`).
    """
    from attn_ring.sharding import shard_sequence

    _check_2d("input_ids", input_ids)
    shape = tuple(input_ids.shape)
    rank, world = _rank_and_world(group)
    B, N = shape
    if position_ids is None:
        position_ids = torch.arange(N, device=input_ids.device).expand(B, N)
    if attention_mask is None:
        attention_mask = torch.ones(shape, dtype=torch.long, device=input_ids.device)
    full = {
        "input_ids": input_ids,
        "position_ids": _check_2d("position_ids", position_ids, shape),
        "attention_mask": _check_2d("attention_mask", attention_mask, shape),
    }
    if labels is not None:
        _check_2d("labels", labels, shape)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        full["labels"] = shifted
        full["shift_labels"] = shifted
    # contiguous copies: shards of the contiguous layout are narrow views, which loss code .view()s
    batch = {name: shard_sequence(x, world, rank, layout=layout, dim=1).contiguous() for name, x in full.items()}
    if labels is not None:
        batch["num_items_in_batch"] = (full["labels"] != ignore_index).sum()
    return batch


def gather_logits(
    logits: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """Every rank's (B, N / W, ...) logits put back into the full (B, N, ...) sequence, on every rank.

    Not differentiable (an all_gather): for evaluation and inspection.
    """
    from attn_ring.sharding import unshard_sequence

    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"logits must be a (B, n, ...) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    _, world = _rank_and_world(group)
    shards = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(shards, logits.detach().contiguous(), group=group)
    return unshard_sequence(shards, layout=layout, dim=1)


def reduce_loss(loss: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global mean loss: the sum of every rank's share (from a :func:`shard_batch` batch). Detached."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss must be a one-element tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    _rank_and_world(group)
    total = loss.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def sync_gradients(
    model: torch.nn.Module | Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None
) -> None:
    """Sum the parameters' gradients over the group, in place.

    After backward each rank holds the gradient of its share of the loss (the ring kernels already
    routed the key/value gradients to the ranks that own those tokens); the sum is the gradient of
    the whole loss, the same on every rank. Every rank must call this with the same parameters
    (a trainable parameter without a gradient takes zeros, so no rank skips a collective).
    """
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    _rank_and_world(group)
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must join every all_reduce: an unused parameter adds zeros
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
