"""Sliding windows and packed sequences: what transformers' masks ask for, computed exactly.

The mask function reads transformers' mask rules; its reading is checked against the dense masks
transformers' own sdpa path builds from the same rules. Mistral and Qwen2 with sliding windows on
"block_sparse" match attn_implementation="sdpa" in logits and every gradient (float32 within the
project's 2x rule of the float64 reference), and packed rows (DataCollatorWithFlattening) match each
document run alone.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    SMALL,
    assert_matches,
    compare_to,
    copy_model,
    make_model,
    packed_batch,
    padded_batch,
    register_reference,
    run,
    run_documents,
)
from transformers import MistralConfig
from transformers.masking_utils import (
    chunked_causal_mask_function,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

import attn_sparse
from attn_core import reference
from dilated_attention_pytorch import hf
from dilated_attention_pytorch.hf.masks import make_mask_function

N = 24


def _masks(window: int | None, causal: bool, position_ids: torch.Tensor, attention_mask, **overlay) -> tuple:
    """(transformers' sdpa mask (N, N) bool, our PaddingMask) built by the model-side mask helpers."""
    config = MistralConfig(**SMALL, sliding_window=window, is_causal=causal)
    make = create_sliding_window_causal_mask if window else create_causal_mask
    embeds = torch.zeros(1, N, 8)
    built = []
    for impl in ("sdpa", hf.register("block_sparse")):
        config._attn_implementation = impl
        built.append(
            make(
                config=config,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
                allow_is_causal_skip=False,
                **overlay,
            )
        )
    return built[0][0, 0], built[1]


@pytest.mark.parametrize(
    ("window", "causal", "starts", "padding"),
    [
        (None, True, [0], 0),
        (None, False, [0], 0),
        (5, True, [0], 0),
        (5, True, [0], 6),  # left padding
        (5, False, [0], 0),  # bidirectional window: |i - j| <= W
        (None, True, [0, 7, 19], 0),  # packed documents
        (4, True, [0, 3, 10, 11], 0),  # packed, window inside each document
    ],
)
def test_mask_function_reads_transformers_rules_exactly(window, causal, starts, padding) -> None:
    ends = [*starts[1:], N]
    # each document's positions restart, at 0 or 40 (only their differences matter)
    position_ids = torch.cat([torch.arange(e - s) + 40 * (i % 2) for i, (s, e) in enumerate(zip(starts, ends))])[None]
    attention_mask = None
    if padding:
        attention_mask = torch.ones(1, N, dtype=torch.long)
        attention_mask[0, :padding] = 0
    dense, ours = _masks(window, causal, position_ids, attention_mask)
    assert ours.exact and ours.is_causal == causal
    expected_window = None if window is None else ((window - 1, -1) if causal else (window, window))
    assert ours.window == expected_window
    if len(starts) > 1:
        assert ours.cu_seqlens.tolist() == [*starts, N] and ours.cu_seqlens.dtype == torch.int32
    else:
        assert ours.cu_seqlens is None and ours.document_ids is None
    read = reference.document_mask(N, N, cu_seqlens=ours.cu_seqlens, is_causal=ours.is_causal, window_size=ours.window)
    if ours.key_padding_mask is not None:
        read = read & ~ours.key_padding_mask[0][None, :]
    assert torch.equal(read, dense)


def test_unrecognised_mask_rules_are_not_exact() -> None:
    positions = torch.arange(N)[None]
    _, with_or = _masks(None, True, positions, None, or_mask_function=lambda b, h, q, kv: kv == 0)
    _, with_and = _masks(None, True, positions, None, and_mask_function=lambda b, h, q, kv: kv != 3)
    mask_function = make_mask_function()
    chunked = mask_function(
        kv_length=N, mask_function=chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long))
    )
    assert not (with_or.exact or with_and.exact or chunked.exact)


def _windows_seen(monkeypatch: pytest.MonkeyPatch) -> list:
    seen = []
    kernel = attn_sparse.block_sparse_attention

    def recorded(*args, **kwargs):
        seen.append((args[3], kwargs["window_size"], kwargs["cu_seqlens"]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attn_sparse, "block_sparse_attention", recorded)
    return seen


SLIDING = {
    "mistral": ("mistral", {"sliding_window": 8}),
    # layer 0 full, layer 1 sliding (max_window_layers=1)
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # the same through explicit layer_types, the other way round
    "qwen2_layer_types": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    # config.is_causal=False: transformers' bidirectional window keeps |q - k| <= 8
    "mistral_bidirectional": ("mistral", {"sliding_window": 8, "is_causal": False}),
}
WINDOWS = {
    "mistral": [(7, 0)] * 2,
    "qwen2": [None, (7, 0)],
    "qwen2_layer_types": [(7, 0), None],
    "mistral_bidirectional": [(8, 8)] * 2,
}


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("label", list(SLIDING))
def test_sliding_window_models_match_sdpa(label: str, padding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    family, config = SLIDING[label]
    model = make_model(family, seed=4, **config)
    batch = padded_batch(padding)
    seen = _windows_seen(monkeypatch)
    res = compare_to(model, hf.register("block_sparse"), batch, "sdpa")
    keep = batch["attention_mask"].bool()
    assert_matches(f"{label}/{padding}", res["ours"], res["ref"], res["base"], keep)
    # each layer got the window transformers applies there (q - 8 < k <= q), tiles derived from the masks
    assert [(layout, window) for layout, window, _ in seen] == [(None, w) for w in WINDOWS[label]]
    # and the window matters at this length: without it the model computes something else
    windowless = run(
        copy_model(make_model(family, seed=4, is_causal=config.get("is_causal", True)), "sdpa", torch.float64), batch
    )
    assert (windowless[0] - res["ref"][0])[keep].abs().max() > 1e-3


def _tiles(n: int, h: int, causal: bool) -> torch.Tensor:
    layout = attn_sparse.local_window(n, 16, block_size=16)
    return reference.block_sparse_weights(layout.to_dense(), (16, 16), n, n, is_causal=causal)


def test_a_pattern_intersects_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # block-granular local tiles (16 to 31 tokens back) and the model's token-exact 24-token causal window:
    # each cuts keys the other keeps; the reference applies the tiles inside transformers' own window mask
    name = hf.register("block_sparse", pattern="local_window", pattern_options={"window": 16}, block_size=16)
    ref_name = register_reference("test_ref_tiles_in_window", _tiles)
    seen = _windows_seen(monkeypatch)
    batch = padded_batch("right", seq_len=56)
    res = compare_to(make_model("mistral", seed=6, sliding_window=24), name, batch, ref_name)
    assert_matches("pattern & window", res["ours"], res["ref"], res["base"], batch["attention_mask"].bool())
    assert seen and all(layout is not None and window == (23, 0) for layout, window, _ in seen)


PACKED = {
    # label: (family, model config, registration, packing source)
    "causal": ("llama", {}, ("block_sparse", {}), "position_ids"),
    "window": ("mistral", {"sliding_window": 6}, ("block_sparse", {}), "position_ids+cu_seq_lens"),
    # with a KV cache transformers' mask does not separate documents; the flash keywords still do
    "qwen2_window_cache": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
        ("block_sparse", {}),
        "cu_seq_lens",
    ),
    "longnet_dense": ("llama", {}, ("longnet", {"segment_lengths": [32], "dilation_rates": [1]}), "position_ids"),
}


@pytest.mark.parametrize("label", list(PACKED))
def test_packed_rows_match_each_document_alone(label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    family, config, (kind, options), source = PACKED[label]
    lengths = [7, 12, 5] if label != "window" else [9, 3, 14, 6]
    batch, docs = packed_batch(lengths, flash_kwargs="cu_seq_lens" in source)
    batch = {**batch, "use_cache": source == "cu_seq_lens"}
    model = make_model(family, seed=8, **config)
    seen = _windows_seen(monkeypatch)
    ours = run(copy_model(model, hf.register(kind, **options), torch.float32), batch)
    ref = run_documents(copy_model(model, "sdpa", torch.float64), docs)
    base = run_documents(copy_model(model, "sdpa", torch.float32), docs)
    assert_matches(f"packed {label}", ours, ref, base)
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    assert all(cu.tolist() == starts for _, _, cu in seen)
    if label == "causal":  # packing matters: one causal pass over the whole row is other math
        whole = run(copy_model(model, "sdpa", torch.float64), {k: v for k, v in batch.items() if k != "position_ids"})
        assert (whole[0] - ref[0]).abs().max() > 1e-3


def test_packed_rows_on_dilated_longnet_match_each_document_alone() -> None:
    # the contract for dilated attention: each document run alone (segments start at its start)
    lengths = [10, 17, 5]
    name = hf.register("longnet", segment_lengths=[8, 16], dilation_rates=[1, 2])
    batch, docs = packed_batch(lengths, seed=3)
    model = make_model("llama", seed=9)
    ours = run(copy_model(model, name, torch.float32), {**batch, "use_cache": False})
    ref = run_documents(copy_model(model, name, torch.float64), docs)
    base = run_documents(copy_model(model, name, torch.float32), docs)
    assert_matches("packed dilated", ours, ref, base)
