"""What an attention call from transformers asks for, checked and put in the library's terms.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)`` with query (B, H, N, D) and key, value (B, Hkv, Nk, D), and
expects ``(attn_output (B, N, H, D), attn_weights or None)``. The ``attention_mask`` it passes is
whatever the mask function registered under the same name returned when the model built its
masks (:mod:`.masks`): a :class:`PaddingMask` saying causal or bidirectional, which keys are
padding, the sliding window and the packed documents. :func:`prepare_call` turns that, the layer's
keywords (position_ids, cu_seq_lens_q/k, sliding_window) and the tensors into an
:class:`AttentionCall`, and raises for everything the kind cannot compute exactly instead of
silently changing the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attn_core.validation import check_cu_seqlens

from .masks import PaddingMask, cu_seqlens_from_document_ids, several_documents, transformers_module

__all__ = [
    "VARLEN_KEYWORDS",
    "AttentionCall",
    "check_dropout_free",
    "document_offsets",
    "given_cu_seqlens",
    "prepare_call",
    "same_documents",
]

# the flash-attention varlen keywords transformers hands every attention layer (DataCollatorWithFlattening)
VARLEN_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class AttentionCall:
    """One attention call in the library's terms.

    q: (B, N, H, D); k, v: (B, N, Hkv, D) (views of transformers' tensors). key_padding_mask:
    (B, N) bool, True = padding, or None. window_size: (left, right) in tokens (flash-attn's
    convention, -1 = unbounded), only when it masks some key at this N; else None. cu_seqlens:
    int32 (num_docs + 1,) when the one row (B == 1) holds packed documents; else None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    is_causal: bool
    window_size: tuple[int, int] | None
    cu_seqlens: torch.Tensor | None


def _config_flag(module: torch.nn.Module, name: str) -> Any:
    return getattr(getattr(module, "config", None), name, None)


def _layer_window(kind: str, sliding_window: object, causal: bool) -> tuple[int, int] | None:
    # no mask from transformers: the layer's sliding_window keyword is all there is. For causal
    # layers every transformers path keeps q - W < kv <= q; for bidirectional ones its masks
    # (|q - kv| <= W) and its flash-attention path (W - 1) disagree, so nothing is guessed
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"{kind}: sliding_window must be an int >= 1, got {sliding_window!r}")
    if not causal:
        raise ValueError(
            f"{kind}: a bidirectional layer passes sliding_window={sliding_window} without a mask from "
            "transformers, so the window's width is ambiguous; build the model's masks (pass an attention_mask "
            "or let the model create them)"
        )
    return (sliding_window - 1, 0)


def _active_window(window: tuple[int, int] | None, causal: bool, seq_len: int) -> tuple[int, int] | None:
    """``window`` if it masks some key of an N-token sequence (with a causal mask its right side
    is 0), else None."""
    if window is None:
        return None
    left, right = window
    if causal:
        right = 0
    reach = seq_len - 1
    left_free = left < 0 or left >= reach
    right_free = causal or right < 0 or right >= reach
    return None if left_free and right_free else (left, right)


def _document_ids_from_positions(position_ids: object, batch: int, seq_len: int) -> torch.Tensor | None:
    """(B, N) document ids by transformers' own rule (a position that does not follow its
    predecessor starts a document), or None (no (B or 1, N) position_ids, or no row restarts)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or seq_len < 2:
        return None
    if position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
        return None
    masking = transformers_module("transformers.masking_utils")
    return masking.find_packed_sequence_indices(position_ids.expand(batch, -1))


def _preview(offsets: torch.Tensor, shown: int = 8) -> str:
    values = offsets.tolist()
    return str(values) if len(values) <= shown else f"{str(values[:shown])[:-1]}, ... ({len(values)} offsets)]"


def same_documents(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two offset tensors describe the same documents (empty ones, repeated offsets, change nothing)."""
    return torch.equal(torch.unique_consecutive(a.long()), torch.unique_consecutive(b.long().to(a.device)))


def document_offsets(
    where: str, name: str, cu: object, batch: int, seq_len: int, device: torch.device, hint: str = ""
) -> torch.Tensor:
    """``cu`` checked as integer (num_docs + 1,) offsets of documents packed into one row of
    ``seq_len`` tokens (0 = c[0] <= ... <= c[-1] = seq_len, batch == 1); returned int32 on ``device``.
    Errors start with ``where`` and ``name`` and end with ``hint``."""
    if (
        not isinstance(cu, torch.Tensor)
        or cu.dim() != 1
        or cu.numel() == 0
        or cu.dtype.is_floating_point
        or cu.dtype.is_complex
        or cu.dtype == torch.bool
    ):
        what = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(
            f"{where}: {name} must be a non-empty 1-d integer tensor of document offsets (num_docs + 1,){hint}; "
            f"got {what}"
        )
    if batch != 1:
        raise ValueError(
            f"{where}: {name} describe documents packed into one row, but the batch has B={batch} rows; "
            "flatten the batch into one row (as DataCollatorWithFlattening does)"
        )
    lowest, highest = torch.stack([cu.min(), cu.max()]).tolist()
    if lowest < 0 or highest > seq_len:  # before the int32 cast, which would wrap larger values
        raise ValueError(f"{where}: {name} offsets must lie in [0, {seq_len}], got {lowest}..{highest}{hint}")
    offsets = cu.to(device=device, dtype=torch.int32)
    try:
        check_cu_seqlens(offsets, batch=batch, seq_len=seq_len, device=device)
    except ValueError as exc:
        raise ValueError(f"{where}: {name}: {exc}{hint}") from exc
    return offsets


def given_cu_seqlens(
    kind: str, kwargs: dict[str, Any], batch: int, seq_len: int, device: torch.device, hint: str = ""
) -> torch.Tensor | None:
    """The flash-attention varlen keywords (cu_seq_lens_q/k, e.g. from DataCollatorWithFlattening)
    validated as int32 (num_docs + 1,) offsets over ``seq_len`` tokens on ``device``, or None when
    not given. ``hint`` ends every error."""
    if kwargs.get("cu_seq_lens_q") is None and kwargs.get("cu_seq_lens_k") is None:
        return None

    def tensor(name: str) -> torch.Tensor:
        cu = kwargs.get(name)
        if not isinstance(cu, torch.Tensor):
            raise ValueError(
                f"{kind}: {name} must be a 1-d integer tensor of document offsets, given together with the other "
                f"of cu_seq_lens_q/cu_seq_lens_k; got {type(cu).__name__}"
            )
        return cu

    cu_q, cu_k = tensor("cu_seq_lens_q"), tensor("cu_seq_lens_k")
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k.to(cu_q.device)):
        raise ValueError(
            f"{kind}: cu_seq_lens_q and cu_seq_lens_k differ; queries and keys are one packed sequence here, "
            "so they must be equal"
        )
    return document_offsets(kind, "cu_seq_lens_q/k", cu_q, batch, seq_len, device, hint)


def _packed_documents(
    kind: str,
    attention_mask: object,
    kwargs: dict[str, Any],
    batch: int,
    seq_len: int,
    device: torch.device,
    supported: bool,
) -> torch.Tensor | None:
    """int32 cu_seqlens of the packed documents of the one row, or None when each row is one sequence.

    Sources: the documents transformers' mask separated (position_ids that restart, no 2-d
    attention_mask, no KV cache) and the flash-attention keywords cu_seq_lens_q/k; when both are
    given they must agree. Restarting position_ids that transformers' mask did not separate (it
    skips that with a KV cache) are refused rather than guessed.
    """
    given = given_cu_seqlens(kind, kwargs, batch, seq_len, device)
    mask = attention_mask if isinstance(attention_mask, PaddingMask) else None
    ids, from_ids = (None, None) if mask is None else (mask.document_ids, mask.cu_seqlens)
    separated_by_mask = ids is not None
    if ids is None and not (mask is not None and mask.from_attention_mask):
        ids = _document_ids_from_positions(kwargs.get("position_ids"), batch, seq_len)
        if ids is not None and not several_documents(ids):
            ids = None
    packed_given = given is not None and torch.unique_consecutive(given).numel() > 2
    if ids is None and not packed_given:
        return None
    if not supported:
        raise ValueError(
            f"{kind}: packed sequences (several documents in one row, from position_ids that restart or "
            f"cu_seq_lens_q/k) are not supported by {kind!r}; 'longnet' and 'block_sparse' take them, 'ring' takes "
            "them cut by dilated_attention_pytorch.hf.shard_batch, or pad the batch to one sequence per row"
        )
    if ids is not None and ids.shape[0] != 1:
        raise ValueError(
            f"{kind}: packed sequences need the whole batch in one row (B == 1, as DataCollatorWithFlattening "
            f"gives), got B={ids.shape[0]} with position_ids restarting inside a row; flatten the batch, or pad it "
            "with an attention_mask instead of packing"
        )
    if ids is not None and from_ids is None:
        from_ids = cu_seqlens_from_document_ids(ids[0])
    if given is not None:
        if from_ids is not None and not same_documents(given, from_ids):
            raise ValueError(
                f"{kind}: cu_seq_lens_q/k ({_preview(given)}) and the documents position_ids give "
                f"({_preview(from_ids)}) differ"
            )
        return given
    if not separated_by_mask:
        raise ValueError(
            f"{kind}: position_ids restart inside the row (packed sequences), but transformers' mask does not "
            "separate the documents (it does so only without a KV cache): pass use_cache=False (Trainer does), "
            "or give cu_seq_lens_q/cu_seq_lens_k"
        )
    return None if from_ids is None else from_ids.to(device)  # built where the embeddings live


def prepare_call(
    kind: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    is_causal: bool | None,
    kwargs: dict[str, Any],
    *,
    windows: bool,
    documents: bool,
) -> AttentionCall:
    """Check what transformers asked for and return it as an :class:`AttentionCall`.

    windows / documents: whether ``kind`` computes token-exact sliding windows / packed documents.
    Raises ValueError for everything ``kind`` cannot compute exactly, naming it.
    """
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
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        raise ValueError(f"{kind}: query, key, value must be 4-d (B, H, N, D) tensors")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{kind}: query length {query.shape[2]} != key length {key.shape[2]}: decoding with a KV cache "
            "is not supported. Train or score with use_cache=False; to generate, switch the model back with "
            "model.set_attn_implementation('sdpa')."
        )
    B, N = query.shape[0], query.shape[2]
    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        key_padding_mask = None
        window = _layer_window(kind, kwargs.get("sliding_window"), causal)
    elif isinstance(attention_mask, PaddingMask):
        if not attention_mask.exact:
            raise ValueError(
                f"{kind}: transformers asked for a mask beyond causal/bidirectional attention with padding, "
                "sliding windows and packed sequences (e.g. chunked attention, image-token blocks or a custom "
                "mask overlay), which is not supported"
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
        window = attention_mask.window  # what transformers' own sdpa/eager masks apply
    else:
        raise ValueError(
            f"{kind}: got a custom attention mask ({type(attention_mask).__name__}"
            f"{'' if not isinstance(attention_mask, torch.Tensor) else f' of shape {tuple(attention_mask.shape)}'}); "
            "only a 2-d (B, N) padding mask is supported: pass attention_mask of 0/1 per token"
        )
    window = _active_window(window, causal, N)
    if window is not None and not windows:
        raise ValueError(
            f"{kind}: this layer attends through a token-exact sliding window (window_size={window} over {N} "
            f"tokens, from the model's sliding_window, e.g. Mistral or Qwen2 with use_sliding_window), which "
            f"{kind!r} cannot apply; register 'block_sparse' (it applies the window exactly), or use a config "
            "without sliding_window"
        )
    cu_seqlens = _packed_documents(kind, attention_mask, kwargs, B, N, query.device, documents)
    # (B, H, N, D) -> (B, N, H, D): views, no copies; the kernels read through strides
    return AttentionCall(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        key_padding_mask,
        causal,
        window,
        cu_seqlens,
    )


def check_dropout_free(kind: str, dropout: float) -> None:
    """Raise for attention dropout ``kind``'s kernels do not implement."""
    if dropout:
        raise ValueError(
            f"{kind}: attention dropout {dropout} is not supported by this kind's kernels; set the model "
            "config's attention_dropout to 0.0 (only 'longnet' implements attention dropout)"
        )
