"""Hugging Face transformers integration: any HF causal LM on LongNet, block-sparse or ring attention.

    from dilated_attention_pytorch import hf

    name = hf.register("longnet", segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    # or, on a model already loaded: model.set_attn_implementation(name)

:func:`register` adds an attention function and its mask function to transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` and returns the name to pass as
``attn_implementation``. Kinds:

- ``"longnet"``: :func:`attn_core.dilated_attention`; options ``segment_lengths``,
  ``dilation_rates``, ``head_mode`` ("all"), ``backend`` ("auto").
- ``"block_sparse"``: :func:`attn_sparse.block_sparse_attention`. With no layout options it follows
  the model's masks exactly: causal (or bidirectional), the config's sliding window (Mistral,
  Qwen2's sliding layers) and packed documents, with the tiles derived from them. ``layout`` (a
  fixed :class:`attn_sparse.BlockLayout`) or ``pattern`` (a name in :data:`attn_sparse.PATTERNS`)
  with ``pattern_options`` (the pattern's keywords besides seq_len) and ``block_size`` (128) adds
  a sparsity pattern, intersected with those masks (layouts built from a pattern are cached per
  sequence length); ``backend``.
- ``"ring"``: :func:`attn_ring.ring_attention` over ``group`` (None: the default group) with
  ``layout`` "zigzag" (default; balances causal work) or "contiguous". Takes packed sequences cut
  by :func:`shard_batch`, which passes the whole row's document offsets as ``cu_seq_lens_q/k``.
- ``"ring_dilated"``: :func:`attn_ring.ring_dilated_attention` over ``group``; options as for
  "longnet" (contiguous shards).

For the ring kinds every rank holds one shard of each sequence: :func:`shard_batch` cuts a batch
(packed too, for "ring"), :func:`gather_logits`, :func:`reduce_loss` and :func:`sync_gradients` put
results together.

What transformers passes is honoured exactly: causal or bidirectional masks, padding (left or
right: a 2-d attention_mask becomes ``key_padding_mask``; padded query rows give 0, never NaN),
GQA (K/V heads are not repeated), ``scaling`` and (longnet only) attention dropout.
Token-exact sliding windows as transformers' sdpa/eager masks apply them (causal: q - W < k <= q,
i.e. ``window_size=(W - 1, 0)``) run on "block_sparse". Packed sequences run on "longnet" and
"block_sparse" as each document run alone: one row (B == 1) whose position_ids restart (as
DataCollatorWithFlattening gives; transformers separates them when the model runs without a KV
cache, e.g. use_cache=False or under Trainer) and/or the flash-attention keywords
``cu_seq_lens_q``/``cu_seq_lens_k``. What a kind cannot compute exactly raises ValueError naming it:
windows on "longnet" and the ring kinds, packed sequences on "ring_dilated", with B > 1 or (on
"ring") not cut by :func:`shard_batch`,
softcapping, attention sinks, position biases, output_attentions, custom 4-d masks, mask overlays
(chunked attention, image-token blocks) and decoding with a KV cache (query length != key length).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from collections.abc import Callable
from typing import Any

import torch

from attn_core.config import DilatedConfig

from .attention import VARLEN_KEYWORDS, AttentionCall, check_dropout_free, given_cu_seqlens, prepare_call
from .masks import PaddingMask, make_mask_function, transformers_module
from .ring import document_positions, gather_logits, reduce_loss, shard_batch, sync_gradients

__all__ = [
    "KINDS",
    "PaddingMask",
    "gather_logits",
    "reduce_loss",
    "register",
    "shard_batch",
    "sync_gradients",
]

KINDS = ("longnet", "block_sparse", "ring", "ring_dilated")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "longnet": ("segment_lengths", "dilation_rates", "head_mode", "backend"),
    "block_sparse": ("layout", "pattern", "pattern_options", "block_size", "backend"),
    "ring": ("group", "layout"),
    "ring_dilated": ("segment_lengths", "dilation_rates", "head_mode", "group"),
}

# kinds that compute token-exact sliding windows / packed documents (cu_seqlens of the call's tokens)
_WINDOW_KINDS = ("block_sparse",)
_DOCUMENT_KINDS = ("longnet", "block_sparse")
# kinds whose calls hold one shard of each sequence: the varlen keywords (from shard_batch) describe
# the whole sequence, so the kind reads them itself rather than prepare_call (which checks a call's own tokens)
_SHARDED_KINDS = ("ring", "ring_dilated")

# (call, softmax scale, dropout, the layer's keywords: position_ids, cu_seq_lens_q/k, ...) -> (B, N, H, D)
Compute = Callable[[AttentionCall, "float | None", float, dict[str, Any]], torch.Tensor]


def _require(module: str, extra: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed: pip install 'dilated-attention-pytorch[{extra}]'")
    return importlib.import_module(module)


def _check_backend(kind: str, backend: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(backend, str) or backend not in ("auto", *allowed):
        raise ValueError(f"{kind}: backend must be 'auto' or one of {allowed}, got {backend!r}")
    return backend


def _dilated_options(kind: str, options: dict[str, Any]) -> DilatedConfig:
    missing = [name for name in ("segment_lengths", "dilation_rates") if name not in options]
    if missing:
        raise TypeError(f"{kind}: missing required option(s) {missing}")
    return DilatedConfig(options["segment_lengths"], options["dilation_rates"], options.get("head_mode", "all"))


def _longnet(options: dict[str, Any]) -> Compute:
    import attn_core

    cfg = _dilated_options("longnet", options)
    backend = _check_backend("longnet", options.get("backend", "auto"), attn_core.BACKENDS)

    def compute(call, scale, dropout, kwargs):
        return attn_core.dilated_attention(
            call.q,
            call.k,
            call.v,
            cfg.segment_lengths,
            cfg.dilation_rates,
            is_causal=call.is_causal,
            key_padding_mask=call.key_padding_mask,
            softmax_scale=scale,
            dropout_p=dropout,
            head_mode=cfg.head_mode,
            cu_seqlens=call.cu_seqlens,
            backend=backend,
        )

    return compute


def _block_sparse(options: dict[str, Any]) -> Compute:
    attn_sparse = _require("attn_sparse", "sparse")
    backend = _check_backend("block_sparse", options.get("backend", "auto"), attn_sparse.BACKENDS)
    fixed = options.get("layout")
    pattern = options.get("pattern")
    cache = attn_sparse.LayoutCache()
    if fixed is not None:
        if not isinstance(fixed, attn_sparse.BlockLayout):
            raise TypeError(f"block_sparse: layout must be an attn_sparse.BlockLayout, got {type(fixed).__name__}")
        extra = [name for name in ("pattern", "pattern_options", "block_size") if name in options]
        if extra:
            raise TypeError(f"block_sparse: give either layout or pattern options, not both (also got {extra})")
    elif pattern is not None:
        if not isinstance(pattern, str) or pattern not in attn_sparse.PATTERNS:
            raise ValueError(f"block_sparse: pattern must be one of {sorted(attn_sparse.PATTERNS)}, got {pattern!r}")
        pattern_options = options.get("pattern_options", {})
        if not isinstance(pattern_options, dict):
            raise TypeError(f"block_sparse: pattern_options must be a dict, got {type(pattern_options).__name__}")
        reserved = sorted({"seq_len", "block_size", "device"} & set(pattern_options))
        if reserved:
            raise ValueError(f"block_sparse: pattern_options must not set {reserved} (they come from the call)")
        block_size = list(attn_sparse.layout.check_block_size(options.get("block_size", 128)))
        # a trial build names a wrong keyword or value now rather than at the first forward
        cache.get(pattern, seq_len=2 * max(block_size), block_size=block_size, **pattern_options)
    else:
        stray = [name for name in ("pattern_options", "block_size") if name in options]
        if stray:
            raise TypeError(
                f"block_sparse: {stray} shape a pattern's layout; give pattern=... too (one of "
                f"{sorted(attn_sparse.PATTERNS)}), or neither to follow the model's masks"
            )

    def compute(call, scale, dropout, kwargs):
        check_dropout_free("block_sparse", dropout)
        n = call.q.shape[1]
        if fixed is not None:
            layout = fixed
        elif pattern is not None:
            layout = cache.get(pattern, seq_len=n, block_size=block_size, **pattern_options)
        elif call.is_causal or call.window_size is not None or call.cu_seqlens is not None:
            layout = None  # the tiles follow the masks (attn_sparse derives and caches them)
        else:
            # bidirectional with no window and no documents: every key, as the model asks
            block = list(attn_sparse.api.DERIVED_BLOCK_SIZE)
            layout = cache.get("local_window", seq_len=n, window=n, block_size=block)
        return attn_sparse.block_sparse_attention(
            call.q,
            call.k,
            call.v,
            layout,
            is_causal=call.is_causal,
            window_size=call.window_size,
            cu_seqlens=call.cu_seqlens,
            key_padding_mask=call.key_padding_mask,
            softmax_scale=scale,
            backend=backend,
        )

    return compute


def _check_group(kind: str, group: object) -> Any:
    import torch.distributed as dist

    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{kind}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


def _check_ring_positions(
    kind: str, position_ids: object, n: int, group: Any, layout: str, cu_seqlens: torch.Tensor | None = None
) -> None:
    # a rank given the whole sequence instead of its shard would silently attend over W copies of it:
    # the positions transformers passes must be this rank's shard of the n * W token sequence (counting
    # from 0 in each packed document when cu_seqlens, the whole sequence's offsets, are given)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return
    import torch.distributed as dist

    from attn_ring.sharding import shard_positions

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    expected = shard_positions(n * world, world, rank, layout).to(position_ids.device)
    what = f"rank {rank}'s {layout!r} shard of a {n * world}-token sequence"
    if cu_seqlens is not None:
        expected = document_positions(cu_seqlens.to(position_ids.device), n * world)[expected]
        what = f"{what} packed as cu_seq_lens_q/k say (counting from 0 in each document)"
    if position_ids.shape[-1] != n or not bool((position_ids == expected).all()):
        raise ValueError(
            f"{kind}: position_ids are not {what} over {world} ranks; cut each batch with "
            f"dilated_attention_pytorch.hf.shard_batch(..., layout={layout!r})"
        )


def _ring_documents(kind: str, call: AttentionCall, kwargs: dict[str, Any], group: Any) -> torch.Tensor | None:
    """int32 offsets of the documents packed into the whole sequence (cu_seq_lens_q/k, as
    :func:`shard_batch` gives them: the same on every rank), checked against the n * W tokens; None
    when not given."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    hint = (
        f" (on the ring they are the offsets of the whole {call.q.shape[1] * world}-token sequence over {world} "
        "ranks, not of this shard: let dilated_attention_pytorch.hf.shard_batch give them)"
    )
    return given_cu_seqlens(kind, kwargs, call.q.shape[0], call.q.shape[1] * world, call.q.device, hint)


def _ring(options: dict[str, Any]) -> Compute:
    attn_ring = _require("attn_ring", "ring")
    group = _check_group("ring", options.get("group"))
    layout = attn_ring.sharding.check_layout(options.get("layout", "zigzag"))

    def compute(call, scale, dropout, kwargs):
        check_dropout_free("ring", dropout)
        cu_seqlens = _ring_documents("ring", call, kwargs, group)
        _check_ring_positions("ring", kwargs.get("position_ids"), call.q.shape[1], group, layout, cu_seqlens)
        if call.key_padding_mask is not None:
            raise ValueError(
                "ring: ring attention takes no padding mask and this batch has padding; fill every row to full "
                "length without padding, or register 'ring_dilated'"
            )
        return attn_ring.ring_attention(
            call.q,
            call.k,
            call.v,
            group=group,
            is_causal=call.is_causal,
            layout=layout,
            softmax_scale=scale,
            cu_seqlens=cu_seqlens,
        )

    return compute


def _ring_dilated(options: dict[str, Any]) -> Compute:
    attn_ring = _require("attn_ring", "ring")
    cfg = _dilated_options("ring_dilated", options)
    group = _check_group("ring_dilated", options.get("group"))

    def compute(call, scale, dropout, kwargs):
        check_dropout_free("ring_dilated", dropout)
        if any(kwargs.get(name) is not None for name in ("cu_seq_lens_q", "cu_seq_lens_k")):
            raise ValueError(
                "ring_dilated: packed sequences (cu_seq_lens_q/k, e.g. from shard_batch(..., cu_seqlens=...) or "
                "restarting position_ids) are not supported by 'ring_dilated' (ring dilated attention takes no "
                "document offsets); register 'ring' for packed batches, or pad the batch to one sequence per row"
            )
        _check_ring_positions("ring_dilated", kwargs.get("position_ids"), call.q.shape[1], group, "contiguous")
        q, k, v, key_padding_mask = call.q, call.k, call.v, call.key_padding_mask
        if key_padding_mask is None:
            # every rank must pass a mask or none (checked by the ring's handshake), and padding may sit
            # on some ranks' shards only: always pass one
            key_padding_mask = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
        return attn_ring.ring_dilated_attention(
            q,
            k,
            v,
            cfg.segment_lengths,
            cfg.dilation_rates,
            group=group,
            is_causal=call.is_causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=scale,
            head_mode=cfg.head_mode,
        )

    return compute


_BUILDERS: dict[str, Callable[[dict[str, Any]], Compute]] = {
    "longnet": _longnet,
    "block_sparse": _block_sparse,
    "ring": _ring,
    "ring_dilated": _ring_dilated,
}


def _option_key(value: object) -> object:
    # JSON-able options name the registration by content; objects (a process group, a layout) by identity,
    # which stays unique because the registered function keeps them alive
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_option_key(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _option_key(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return f"{type(value).__name__}@{id(value):x}"


def _name(kind: str, options: dict[str, Any]) -> str:
    canonical = json.dumps(_option_key(options), sort_keys=True, separators=(",", ":"))
    return f"dap_{kind}_{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def register(kind: str, **options: Any) -> str:
    """Register ``kind`` with transformers; return the name for ``attn_implementation=``.

    kind: one of :data:`KINDS`; options as listed in this module's docstring. Registering the same
    kind and options again returns the same name. Raises ValueError/TypeError for an unknown kind
    or option or a bad option value, and ImportError naming the extra when transformers ([hf]) or
    the kind's package ([sparse], [ring]) is missing.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        raise TypeError(f"{kind}: unknown option(s) {unknown}; allowed: {list(_OPTIONS[kind])}")
    transformers = transformers_module()
    compute = _BUILDERS[kind](options)

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: object,
        scaling: float | None = None,
        dropout: float = 0.0,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """transformers' attention contract: query (B, H, N, D), key/value (B, Hkv, N, D) -> ((B, N, H, D), None)."""
        own = {k: v for k, v in kwargs.items() if k not in VARLEN_KEYWORDS} if kind in _SHARDED_KINDS else kwargs
        call = prepare_call(
            kind,
            module,
            query,
            key,
            value,
            attention_mask,
            is_causal,
            own,
            windows=kind in _WINDOW_KINDS,
            documents=kind in _DOCUMENT_KINDS,
        )
        return compute(call, scaling, float(dropout), kwargs), None

    name = _name(kind, options)
    transformers.AttentionInterface.register(name, attention)
    transformers.AttentionMaskInterface.register(name, make_mask_function())
    return name
