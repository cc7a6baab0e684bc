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

Packed sequences (documents packed into one row, as DataCollatorWithFlattening gives) run on "ring"
as each document alone, documents crossing shard boundaries included:

    batch = hf.shard_batch(input_ids, labels, position_ids=position_ids, group=group)  # restarting positions
    batch = hf.shard_batch(input_ids, labels, cu_seqlens=cu_seqlens, group=group)      # or the offsets

The returned batch carries the whole row's offsets as ``cu_seq_lens_q``/``cu_seq_lens_k``, which
transformers hands to every attention layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .attention import document_offsets, same_documents
from .masks import cu_seqlens_from_document_ids, several_documents, transformers_module

__all__ = ["document_positions", "gather_logits", "reduce_loss", "shard_batch", "sync_gradients"]


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


def document_positions(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(seq_len,) int64 positions counting from 0 in each document of int (num_docs + 1,) offsets."""
    tokens = torch.arange(seq_len, device=cu_seqlens.device)
    starts = cu_seqlens.long()
    # the document of token t is the last one starting at or before t (empty documents are skipped over)
    document = torch.searchsorted(starts, tokens, right=True) - 1
    return tokens - starts[document.clamp(0, starts.numel() - 1)]


def _packed_offsets(
    cu_seqlens: object, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """int32 (num_docs + 1,) offsets of the documents packed into the one row, from ``cu_seqlens``
    and/or position_ids that restart (transformers' rule: a position that does not follow its
    predecessor starts a document); None when the batch is not packed."""
    B, N = shape
    from_positions = None
    if position_ids is not None and N > 1:
        masking = transformers_module("transformers.masking_utils")
        ids = masking.find_packed_sequence_indices(position_ids)
        if ids is not None and several_documents(ids):
            if B != 1:
                raise ValueError(
                    "shard_batch: position_ids restart inside a row (packed sequences), which needs the whole batch "
                    f"in one row (B == 1, as DataCollatorWithFlattening gives), got B={B}"
                )
            from_positions = cu_seqlens_from_document_ids(ids[0])
    offsets = from_positions
    if cu_seqlens is not None:
        device = position_ids.device if position_ids is not None else torch.device("cpu")
        offsets = document_offsets("shard_batch", "cu_seqlens", cu_seqlens, B, N, device)
        if from_positions is not None and not same_documents(offsets, from_positions):
            raise ValueError(
                f"shard_batch: cu_seqlens {offsets.tolist()[:8]} and the documents where position_ids restart "
                f"{from_positions.tolist()[:8]} differ"
            )
    if offsets is not None and attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "shard_batch: a packed batch takes no padding (its attention_mask has zeros); pack the documents to "
            "the full length instead"
        )
    return offsets


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
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

    Packed sequences (the "ring" kind only): documents packed into one row (B == 1), given as
    ``cu_seqlens`` (integer (num_docs + 1,) offsets 0 = c[0] <= ... <= c[-1] = N) and/or as
    position_ids that restart at each document (DataCollatorWithFlattening's; they must count from
    0 in each document); both given must agree. No padding. Then position_ids count from 0 in each
    document, the first label of each document becomes ``ignore_index`` (no token predicts across
    a document boundary, as DataCollatorWithFlattening sets them), and the batch carries
    ``cu_seq_lens_q`` and ``cu_seq_lens_k``: the int32 offsets of the *whole* N-token row, the same
    on every rank (not this shard's). transformers hands these keywords to every attention layer
    (also when gradient checkpointing recomputes one), and the "ring" kind passes them to
    :func:`attn_ring.ring_attention` as its global ``cu_seqlens``; documents may cross shard
    boundaries. Pass this batch only to a model on the "ring" kind: flash-attention
    implementations read the same keywords as offsets of their local input.
    """
    from attn_ring.sharding import check_layout, shard_sequence

    _check_2d("input_ids", input_ids)
    shape = tuple(input_ids.shape)
    rank, world = _rank_and_world(group)
    check_layout(layout)
    B, N = shape
    given_positions = None if position_ids is None else _check_2d("position_ids", position_ids, shape)
    if attention_mask is not None:
        _check_2d("attention_mask", attention_mask, shape)
    offsets = _packed_offsets(cu_seqlens, given_positions, attention_mask, (B, N))
    if offsets is None:
        position_ids = torch.arange(N, device=input_ids.device).expand(B, N)
    else:
        offsets = offsets.to(input_ids.device)
        position_ids = document_positions(offsets, N).expand(B, N)
    if given_positions is not None and not torch.equal(given_positions, position_ids.to(given_positions.device)):
        what = "each document's" if offsets is not None else "each row's"
        raise ValueError(
            f"position_ids must count 0, 1, 2, ... along {what} tokens (the ring checks each shard by them), "
            f"got {given_positions[0, :8].tolist()}..."
        )
    if attention_mask is None:
        attention_mask = torch.ones(shape, dtype=torch.long, device=input_ids.device)
    full = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    if labels is not None:
        _check_2d("labels", labels, shape)
        if offsets is not None:  # a document's first token is not predicted from the one before it
            starts = offsets[(offsets > 0) & (offsets < N)].long()
            labels = labels.clone()
            labels[:, starts] = ignore_index
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        full["labels"] = shifted
        full["shift_labels"] = shifted
    # contiguous copies: shards of the contiguous layout are narrow views, which loss code .view()s
    batch = {name: shard_sequence(x, world, rank, layout=layout, dim=1).contiguous() for name, x in full.items()}
    if labels is not None:
        batch["num_items_in_batch"] = (full["labels"] != ignore_index).sum()
    if offsets is not None:
        batch["cu_seq_lens_q"] = offsets
        batch["cu_seq_lens_k"] = offsets
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
