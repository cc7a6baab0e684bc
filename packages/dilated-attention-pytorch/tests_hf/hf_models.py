"""Tiny random HF causal LMs and the comparisons the HF tests share (importable by spawned ranks too)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask

from attn_core import reference
from attn_core.testing import assert_close_to_reference

VOCAB = 61
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: K/V heads are never repeated by the integration
    "max_position_embeddings": 256,
}


def make_model(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (llama, qwen2, mistral) in float64, eval mode."""
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    defaults: dict[str, Any] = {"sliding_window": None} if family == "mistral" else {}
    config = config_cls(**{**SMALL, **defaults, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).to(torch.float64).eval()


def copy_model(model: torch.nn.Module, attn_implementation: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` running ``attn_implementation`` (the weights are the same values)."""
    other = copy.deepcopy(model).to(dtype)
    other.set_attn_implementation(attn_implementation)
    return other


def padded_batch(padding: str, batch: int = 2, seq_len: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (B, N); ``padding`` "none", "left" or "right" (rows padded differently)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padding != "none":
        for b in range(batch):
            pad = 3 + 4 * b
            if padding == "left":
                mask[b, :pad] = 0
            else:
                mask[b, seq_len - pad :] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (B, N, V) and every parameter's gradient of the (padding-free) loss."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def compare_to(
    model: torch.nn.Module,
    name: str,
    batch: dict[str, torch.Tensor],
    ref_impl: str,
    base_impl: str | None = None,
    scaling: float | None = None,
) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """run() of ``model`` as "ref" (``ref_impl``, float64), "base" (``base_impl`` or ``ref_impl``,
    float32) and "ours" (``name``, float32); ``scaling`` overrides every layer's softmax scale."""
    models = {
        "ref": copy_model(model, ref_impl, torch.float64),
        "base": copy_model(model, base_impl or ref_impl, torch.float32),
        "ours": copy_model(model, name, torch.float32),
    }
    if scaling is not None:  # a softmax scale other than 1/sqrt(D) must reach the kernels
        for m in models.values():
            for layer in m.model.layers:
                layer.self_attn.scaling = scaling
    return {key: run(m, batch) for key, m in models.items()}


def packed_batch(lengths: list[int], seed: int = 2, flash_kwargs: bool = False) -> tuple[dict, list[torch.Tensor]]:
    """Documents of ``lengths`` random tokens packed into one row by transformers' DataCollatorWithFlattening
    (input_ids, labels, position_ids restarting per document; with ``flash_kwargs`` also cu_seq_lens_q/k and
    max_length_q/k), and the documents themselves (1-D)."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    return collate([{"input_ids": d.tolist()} for d in docs]), docs


def run_documents(model: torch.nn.Module, docs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each document run alone: their logits concatenated (1, N, V) and every parameter's gradient of the
    packed batch's loss (the mean over all predicted tokens, so each document's mean weighs by its count)."""
    model.zero_grad(set_to_none=True)
    total = sum(d.numel() - 1 for d in docs)
    logits = []
    for d in docs:
        out = model(input_ids=d[None], labels=d[None], use_cache=False)
        (out.loss * (d.numel() - 1) / total).backward()
        logits.append(out.logits.detach())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, dim=1), grads


def assert_matches(
    name: str,
    actual: tuple[torch.Tensor, dict[str, torch.Tensor]],
    ref: tuple[torch.Tensor, dict[str, torch.Tensor]],
    base: tuple[torch.Tensor, dict[str, torch.Tensor]],
    keep: torch.Tensor | None = None,
) -> None:
    """Logits at kept positions and every gradient within the project's 2x rule of the float64 reference."""
    logits, grads = actual
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits (padding rows must give no NaN)"
    sel = (lambda t: t[keep]) if keep is not None else (lambda t: t)
    assert_close_to_reference(f"{name} logits", sel(logits), sel(ref[0]), sel(base[0]))
    assert set(grads) == set(ref[1]), f"{name}: gradients for {sorted(set(ref[1]) ^ set(grads))} differ in presence"
    for pname, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient for {pname}"
        assert_close_to_reference(f"{name} grad {pname}", g, ref[1][pname], base[1][pname])


def register_reference(name: str, weights: Callable[[int, int, bool], torch.Tensor]) -> str:
    """Register attention computed by attn_core.reference with token weights ``weights(N, H, is_causal)``
    (1 or H, N, N), masked by transformers' own sdpa mask: an independent path for the same math."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        N, H = q.shape[1], q.shape[2]
        w = weights(N, H, True)[None].to(torch.float64)
        if attention_mask is not None:  # transformers' (B, 1, N, N) bool mask, True = attend
            w = w * attention_mask
        out, _ = reference.attention_from_weights(q, k, v, w, softmax_scale=scaling, dtype=query.dtype)
        return out, None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
