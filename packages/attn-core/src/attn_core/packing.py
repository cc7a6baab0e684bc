"""Packed variable-length sequences (flash-attn's varlen convention).

Documents of different lengths are concatenated along the sequence of one batch row, and
``cu_seqlens`` (int32 (num_docs + 1,), 0 = c[0] <= ... <= c[-1] = N) says where each starts:
document i covers positions [c[i], c[i+1]). Attention with ``cu_seqlens`` equals attention run on
each document alone: a query sees only keys of its own document, and causal masks, windows,
dilated segments and positions count from the document's start.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from .validation import check_cu_seqlens, cu_seqlens_on_host

__all__ = [
    "document_positions",
    "document_segments",
    "host_offsets",
    "offsets_from_key",
    "pack_sequences",
    "strided_rows",
    "unpack_sequences",
]


def document_positions(cu_seqlens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, positions), both int64 (N,) on cu_seqlens' device: the document of every packed
    position and its position within that document (restarting at 0 at each document's start).

    Vectorised (one searchsorted), no host reads; cu_seqlens must already be valid
    (:func:`attn_core.validation.check_cu_seqlens`).
    """
    c = cu_seqlens.to(torch.int64)
    pos = torch.arange(seq_len, device=c.device)
    # the last document whose start is <= pos; empty documents (equal offsets) are skipped over
    doc_ids = torch.searchsorted(c[1:], pos, right=True)
    return doc_ids, pos - c[doc_ids]


def document_segments(cu_seqlens: torch.Tensor, segment_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(docs, starts, lengths), int64 (segments,): every document's segments of ``segment_length``
    positions, in order: the document of each, its first packed position (document i's segment s
    starts at c[i] + s * w) and its length (the last segment of a document is cut at the
    document's end; empty documents have none).

    cu_seqlens: valid offsets (int32 or int64, any device); vectorised, no loop over documents.
    """
    c = cu_seqlens.to(torch.int64)
    doc_len = c[1:] - c[:-1]
    counts = -(-doc_len // segment_length)
    doc = torch.repeat_interleave(torch.arange(doc_len.numel(), device=c.device), counts)
    seg = torch.arange(doc.numel(), device=c.device) - (torch.cumsum(counts, 0) - counts)[doc]
    starts = c[doc] + seg * segment_length
    return doc, starts, torch.clamp(doc_len[doc] - seg * segment_length, max=segment_length)


def host_offsets(cu_seqlens: torch.Tensor) -> bytes:
    """The offsets as int64 bytes: the cache key of the plans built from them (:func:`offsets_from_key`
    turns it back into a tensor). Read from :func:`attn_core.validation.cu_seqlens_on_host`'s copy:
    no device read for a tensor already read."""
    c = cu_seqlens_on_host(cu_seqlens).to(torch.int64).contiguous()
    return ctypes.string_at(c.data_ptr(), c.numel() * c.element_size())


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built (index) tensor on ``device``: through pinned memory without waiting for the
    device's queued work on CUDA (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def offsets_from_key(key: bytes) -> torch.Tensor:
    """int64 CPU offsets (num_docs + 1,) from :func:`host_offsets`' bytes."""
    return torch.frombuffer(bytearray(key), dtype=torch.int64)


def strided_rows(starts: torch.Tensor, counts: torch.Tensor, stride: int) -> torch.Tensor:
    """int64 (sum(counts),): for run i, the positions starts[i] + t * stride for t < counts[i], runs in order.

    starts, counts: int64 (runs,) on one device (counts >= 0); vectorised over the runs.
    """
    total = int(counts.sum())
    run = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)
    t = torch.arange(total, device=counts.device) - (torch.cumsum(counts, 0) - counts)[run]
    return starts[run] + t * stride


def pack_sequences(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate 1-D token tensors into one row: (input_ids (1, N), cu_seqlens int32 (num_docs + 1,)).

    sequences: 1-D tensors of one dtype on one device (empty ones give empty documents). Both
    results are on that device. Inverse: :func:`unpack_sequences`.
    """
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences must be a list or tuple of 1-D tensors, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one 1-D tensor, got an empty sequence")
    for i, s in enumerate(sequences):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"sequences[{i}] must be a 1-D torch.Tensor, got {type(s).__name__}")
        if s.dim() != 1:
            raise ValueError(f"sequences[{i}] must be 1-D (one document's tokens), got shape {tuple(s.shape)}")
        if s.dtype != sequences[0].dtype or s.device != sequences[0].device:
            raise ValueError(
                f"sequences must share one dtype and device: sequences[0] is {sequences[0].dtype} on "
                f"{sequences[0].device}, sequences[{i}] is {s.dtype} on {s.device}"
            )
    lengths = [int(s.shape[0]) for s in sequences]
    if sum(lengths) >= 2**31:
        raise ValueError(f"packed length {sum(lengths)} does not fit int32 cu_seqlens (at most 2**31 - 1)")
    device = sequences[0].device
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return torch.cat(list(sequences)).unsqueeze(0), cu_seqlens.to(device)


def unpack_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed x (1, N, ...) into its documents: [x[0, c[i]:c[i+1]] for each document i].

    The pieces are views of x (num_docs of them; empty documents give empty tensors). Reads
    cu_seqlens to the host once (one .tolist()).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (1, N, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (1, N, ...), got shape {tuple(x.shape)}")
    check_cu_seqlens(cu_seqlens, batch=x.shape[0], seq_len=x.shape[1], device=x.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(x[0], lengths))
