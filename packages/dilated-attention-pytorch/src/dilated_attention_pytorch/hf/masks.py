"""The mask function :func:`dilated_attention_pytorch.hf.register` gives transformers, and what it reads.

transformers builds each mask from a token rule ``mask_function(batch_idx, head_idx, q_idx, kv_idx)``
composed with the helpers of ``transformers.masking_utils``: causal or bidirectional; ``and_masks``
with a sliding-window overlay (Mistral, Qwen2's sliding layers); and, for packed rows it finds in
position_ids, the rule evaluated on positions (``remap_positions_for_packed_sequence``) and
intersected with "same document" (``packed_sequence_mask_function``). It then calls the mask
function registered for the attention implementation with that rule and the 2-d attention_mask.

Ours reads the rule instead of evaluating it on N x N tokens: each building block is recognised by
its code object (so a helper that a later transformers renames or changes is not recognised rather
than misread) and turned into the library's masks (causal flag, flash-attn ``window_size``, document
ids). Anything else (``or_masks``, chunked attention, image-token blocks, a user's overlay) makes
the mask not ``exact``, and the attention call refuses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "PaddingMask",
    "cu_seqlens_from_document_ids",
    "make_mask_function",
    "several_documents",
    "transformers_module",
]


def transformers_module(name: str = "transformers") -> ModuleType:
    """Import ``name`` from transformers, or raise ImportError naming the [hf] extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            "dilated_attention_pytorch.hf needs Hugging Face transformers: pip install 'dilated-attention-pytorch[hf]'"
        ) from exc


@dataclass(frozen=True)
class PaddingMask:
    """What the registered mask function gives every attention call of one forward.

    key_padding_mask: (B, Nk) bool, True = padding key to ignore (the library's convention), or
    None when no key is padding. is_causal: the model asked for a causal mask (False:
    bidirectional). exact: False when transformers asked for a rule this integration does not
    recognise (a custom overlay, chunked attention, ...); such a mask is refused. from_attention_mask:
    the model was given a 2-d attention_mask (then, as in transformers, position_ids are not read as
    packed sequences). window: (left, right) in tokens, flash-attn's convention (query i sees keys
    i - left <= j <= i + right, -1 = unbounded), or None. document_ids: (B, N) int, the packed
    document of every token as transformers found it from position_ids (equal ids = one
    document), only when some row holds several documents; else None. cu_seqlens: the same as
    int32 (num_docs + 1,) offsets when the batch is one row (B == 1); else None.
    """

    key_padding_mask: torch.Tensor | None
    is_causal: bool
    exact: bool
    from_attention_mask: bool = False
    window: tuple[int, int] | None = None
    document_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None


def cu_seqlens_from_document_ids(ids: torch.Tensor) -> torch.Tensor:
    """int32 (num_docs + 1,) offsets of the runs of equal values in ids (N,) (one host read)."""
    starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=starts.dtype, device=ids.device)
    end = torch.full((1,), ids.shape[0], dtype=starts.dtype, device=ids.device)
    return torch.cat([zero, starts, end]).to(torch.int32)


def several_documents(ids: torch.Tensor) -> bool:
    """Whether some row of transformers' (B, N) document ids holds more than one document (its ids
    count up from 0 along each row; traced calls give ids even for rows that hold one)."""
    return bool((ids[:, -1] != ids[:, 0]).any())


@dataclass
class _Rule:
    """The intersection of the recognised building blocks read so far (None = unbounded side)."""

    causal: bool = False
    left: int | None = None
    right: int | None = None
    document_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = field(default=None, repr=False)

    def bound(self, left: int | None, right: int | None) -> None:
        if left is not None:
            self.left = left if self.left is None else min(self.left, left)
        if right is not None:
            self.right = right if self.right is None else min(self.right, right)


def _closure(fn: Callable[..., Any]) -> dict[str, Any] | None:
    try:
        return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
    except (AttributeError, ValueError):  # no code object, or an empty cell
        return None


def _window_int(value: object, minimum: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return None
    return value


class _RuleReader:
    """Recognises the masking_utils building blocks of this transformers version by their code objects."""

    def __init__(self, masking: ModuleType) -> None:
        self.masking = masking
        self.causal = masking.causal_mask_function
        self.bidirectional = masking.bidirectional_mask_function
        probe = torch.zeros(1, 1, dtype=torch.long)

        def code(factory: str, *args: Any) -> Any:
            # a helper missing from this transformers version recognises nothing (its masks are refused)
            make = getattr(masking, factory, None)
            return None if make is None else make(*args).__code__

        self.and_code = code("and_masks", self.causal)
        self.sliding_code = code("sliding_window_overlay", 1)
        self.sliding_bidirectional_code = code("sliding_window_bidirectional_overlay", 1)
        self.remap_code = code("remap_positions_for_packed_sequence", self.causal, probe)
        self.documents_code = code("packed_sequence_mask_function", probe)

    def read(self, fn: Callable[..., Any]) -> _Rule | None:
        """The rule ``fn`` computes, or None when any part of it is not recognised."""
        rule = _Rule()
        if not self._read(fn, rule):
            return None
        # a rule evaluated on positions equals the same rule on indices only inside documents whose
        # positions step by 1, which is how transformers cuts them: check it
        if rule.positions is not None and (
            rule.document_ids is None or not self._documents_follow(rule.positions, rule.document_ids)
        ):
            return None
        return rule

    def _documents_follow(self, positions: torch.Tensor, document_ids: torch.Tensor) -> bool:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
            return False
        found = self.masking.find_packed_sequence_indices(positions.expand(document_ids.shape[0], -1))
        return found is not None and found.shape == document_ids.shape and bool((found == document_ids).all())

    def _read(self, fn: Callable[..., Any], rule: _Rule) -> bool:
        if fn is self.causal:
            rule.causal = True
            return True
        if fn is self.bidirectional:  # every key: no constraint
            return True
        code = getattr(fn, "__code__", None)
        cells = _closure(fn)
        if code is None or cells is None:
            return False
        if code is self.and_code:
            return all(self._read(part, rule) for part in cells["mask_functions"])
        if code is self.sliding_code:  # kv > q - W, i.e. q - kv <= W - 1
            width = _window_int(cells["sliding_window"], 1)
            if width is None:
                return False
            rule.bound(width - 1, None)
            return True
        if code is self.sliding_bidirectional_code:  # |q - kv| <= W
            width = _window_int(cells["sliding_window"], 0)
            if width is None:
                return False
            rule.bound(width, width)
            return True
        if code is self.remap_code:
            inner = _Rule()
            if rule.positions is not None or not self._read(cells["mask_function"], inner):
                return False
            if inner.document_ids is not None or inner.positions is not None:
                return False
            rule.causal = rule.causal or inner.causal
            rule.bound(inner.left, inner.right)
            rule.positions = cells["position_ids"]
            return True
        if code is self.documents_code:
            ids = cells["packed_sequence_mask"]
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                return False
            if rule.document_ids is not None and rule.document_ids is not ids:
                return False
            rule.document_ids = ids
            return True
        return False


def make_mask_function() -> Callable[..., PaddingMask]:
    """A mask function for ``transformers.AttentionMaskInterface`` that returns a :class:`PaddingMask`.

    transformers calls it with keywords: batch_size, the query side, kv_length, kv_offset,
    mask_function (its token rule) and attention_mask ((B, total length) bool, True = attend, or
    None). Returning an object rather than None keeps the rule and the padding with every
    attention call; nothing N x N is built.
    """
    reader = _RuleReader(transformers_module("transformers.masking_utils"))

    def mask_function(
        *,
        kv_length: int,
        kv_offset: int = 0,
        mask_function: Callable[..., Any] = reader.causal,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> PaddingMask:
        # the query side (q_length/q_offset, or cache_position before transformers 5.2x) is not
        # needed: attention checks that queries and keys have one length
        key_padding_mask = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            end = kv_offset + kv_length
            if keep.shape[-1] < end:  # generation past the 2D mask's end: the new keys are real tokens
                keep = torch.nn.functional.pad(keep, (0, end - keep.shape[-1]), value=True)
            keep = keep[:, kv_offset:end]
            if not bool(keep.all()):  # one host read per forward; skips the mask when nothing is padding
                key_padding_mask = ~keep
        rule = reader.read(mask_function)
        if rule is None:
            return PaddingMask(key_padding_mask, True, exact=False, from_attention_mask=attention_mask is not None)
        window = None
        if rule.left is not None or rule.right is not None:
            window = (-1 if rule.left is None else rule.left, -1 if rule.right is None else rule.right)
        document_ids = cu_seqlens = None
        if rule.document_ids is not None and several_documents(rule.document_ids):
            document_ids = rule.document_ids
            if document_ids.shape[0] == 1:  # once per forward, not per layer
                cu_seqlens = cu_seqlens_from_document_ids(document_ids[0])
        return PaddingMask(
            key_padding_mask,
            is_causal=rule.causal,
            exact=True,
            from_attention_mask=attention_mask is not None,
            window=window,
            document_ids=document_ids,
            cu_seqlens=cu_seqlens,
        )

    return mask_function
