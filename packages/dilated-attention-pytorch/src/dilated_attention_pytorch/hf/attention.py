"""The attention and mask functions :func:`dilated_attention_pytorch.hf.register` hands to transformers.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)`` with query (B, H, N, D) and key, value (B, Hkv, Nk, D), and
expects ``(attn_output (B, N, H, D), attn_weights or None)``. The ``attention_mask`` it passes is
whatever the mask function registered under the same name returned when the model built its
masks, once per forward: here always a :class:`PaddingMask`, so every call knows whether the model
asked for causal or bidirectional attention, which keys are padding, and whether the model asked
for anything beyond that (packed sequences, sliding windows, custom overlays), which the library's
kernels cannot honour exactly and which therefore raise instead of silently changing the math.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "PaddingMask",
    "check_dropout_free",
    "make_mask_function",
    "prepare_call",
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
    bidirectional). exact: False when transformers asked for more than causal/bidirectional plus
    padding (packed sequences found from position_ids, a sliding window, a custom overlay).
    from_attention_mask: the model was given a 2-d attention_mask (then, as in transformers,
    position_ids are not read as packed sequences).
    """

    key_padding_mask: torch.Tensor | None
    is_causal: bool
    exact: bool
    from_attention_mask: bool = False


def make_mask_function() -> Callable[..., PaddingMask]:
    """A mask function for ``transformers.AttentionMaskInterface`` that returns a :class:`PaddingMask`.

    transformers calls it with keywords: batch_size, the query side, kv_length, kv_offset,
    mask_function (its token rule: plain causal, plain bidirectional, or a composition) and
    attention_mask ((B, total length) bool, True = attend, or None). Returning an object rather than
    None keeps the causal flag and padding with every attention call; nothing N x N is built.
    """
    masking = transformers_module("transformers.masking_utils")
    causal_rule = masking.causal_mask_function
    bidirectional_rule = masking.bidirectional_mask_function

    def mask_function(
        *,
        kv_length: int,
        kv_offset: int = 0,
        mask_function: Callable[..., Any] = causal_rule,
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
        exact = mask_function is causal_rule or mask_function is bidirectional_rule
        return PaddingMask(
            key_padding_mask,
            is_causal=mask_function is not bidirectional_rule,
            exact=exact,
            from_attention_mask=attention_mask is not None,
        )

    return mask_function


def _config_flag(module: torch.nn.Module, name: str) -> Any:
    return getattr(getattr(module, "config", None), name, None)


def _check_not_packed(kind: str, position_ids: object) -> None:
    # transformers finds packed rows only when it builds masks without a KV cache, which eval and
    # the default use_cache=True skip; without a 2-d attention_mask, a position that does not follow
    # its predecessor starts a new document, and attending across it would change the math
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] > 1:
        restarts = torch.diff(position_ids, dim=-1) != 1
        if bool(restarts.any()):
            raise ValueError(
                f"{kind}: packed sequences (position_ids restart inside a row, {int(restarts.sum())} time(s)) are "
                "not supported yet: attention would cross document boundaries. Pad the batch instead of packing "
                "it (an attention_mask turns this check off, as in transformers)."
            )


def prepare_call(
    kind: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Check what transformers asked for; return q, k, v as (B, N, H, D) views, key_padding_mask, is_causal.

    Raises ValueError for everything ``kind`` cannot compute exactly, naming it.
    """
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"{kind}: this model uses a token-exact sliding window (sliding_window={kwargs['sliding_window']}, "
            "e.g. Mistral, or Qwen2 with use_sliding_window=True); token-exact windows are not supported yet. "
            "Use a config without sliding_window, or attn_implementation='sdpa'."
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{kind}: attention logit softcapping (softcap={kwargs['softcap']}) is not supported")
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{kind}: the model passes {name!r} to attention, which is not supported")
    if kwargs.get("output_attentions") or _config_flag(module, "output_attentions"):
        raise ValueError(
            f"{kind}: output_attentions=True is not supported (attention weights are never materialised); "
            "use attn_implementation='eager' to inspect them"
        )
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        offsets = kwargs.get(name)
        if offsets is not None and offsets.numel() > 2:
            raise ValueError(
                f"{kind}: packed sequences ({name} with {offsets.numel() - 1} documents) are not supported yet: "
                "attention would cross document boundaries. Pad the batch instead of packing it."
            )
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        raise ValueError(f"{kind}: query, key, value must be 4-d (B, H, N, D) tensors")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{kind}: query length {query.shape[2]} != key length {key.shape[2]}: decoding with a KV cache "
            "is not supported. Train or score with use_cache=False; to generate, switch the model back with "
            "model.set_attn_implementation('sdpa')."
        )
    if not (isinstance(attention_mask, PaddingMask) and attention_mask.from_attention_mask):
        _check_not_packed(kind, kwargs.get("position_ids"))
    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        key_padding_mask = None
    elif isinstance(attention_mask, PaddingMask):
        if not attention_mask.exact:
            raise ValueError(
                f"{kind}: transformers asked for a mask beyond causal/bidirectional attention with padding: "
                "packed sequences (position_ids that restart inside a row, with no attention_mask), a sliding "
                "window, or a custom mask overlay. These are not supported yet; pass an attention_mask and "
                "one sequence per row instead of packing."
            )
        causal = attention_mask.is_causal
        if is_causal is not None and bool(is_causal) != causal:
            raise ValueError(
                f"{kind}: the layer asks for is_causal={is_causal} but the model built a "
                f"{'causal' if causal else 'bidirectional'} mask"
            )
        key_padding_mask = attention_mask.key_padding_mask
        if key_padding_mask is not None:  # built on the embeddings' device; layers may sit elsewhere
            key_padding_mask = key_padding_mask.to(query.device)
    else:
        raise ValueError(
            f"{kind}: got a custom attention mask ({type(attention_mask).__name__}"
            f"{'' if not isinstance(attention_mask, torch.Tensor) else f' of shape {tuple(attention_mask.shape)}'}); "
            "only a 2-d (B, N) padding mask is supported: pass attention_mask of 0/1 per token"
        )
    # (B, H, N, D) -> (B, N, H, D): views, no copies; the kernels read through strides
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_padding_mask, causal


def check_dropout_free(kind: str, dropout: float) -> None:
    """Raise for attention dropout ``kind``'s kernels do not implement."""
    if dropout:
        raise ValueError(
            f"{kind}: attention dropout {dropout} is not supported by this kind's kernels; set the model "
            "config's attention_dropout to 0.0 (only 'longnet' implements attention dropout)"
        )
