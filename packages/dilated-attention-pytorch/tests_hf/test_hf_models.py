"""HF causal LMs on the library's attention: logits and every parameter gradient against float64 references.

Configs equivalent to dense causal attention are compared with transformers' own "sdpa" path; real
dilated and block-sparse configs with attn_core.reference run through the same model (an independent
path for the same math). float32 results must be within the project's 2x rule (attn_core.testing):
at most twice the float32 baseline's error against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import assert_matches, compare_to, copy_model, make_model, padded_batch, register_reference, run

import attn_sparse
from attn_core import reference
from dilated_attention_pytorch import hf

DENSE_KINDS = {
    # one segment >= N, rate 1: dense
    "longnet": ("longnet", {"segment_lengths": [32], "dilation_rates": [1]}),
    "longnet_split": ("longnet", {"segment_lengths": [32, 64], "dilation_rates": [1, 1], "head_mode": "split"}),
    # no layout options: the tiles follow the model's (causal) mask
    "block_sparse_masks": ("block_sparse", {}),
    # every tile on or below the diagonal, built per sequence length or given fixed
    "block_sparse": ("block_sparse", {"pattern": "causal", "block_size": 16}),
    "block_sparse_layout": ("block_sparse", {"layout": attn_sparse.causal(24, block_size=16)}),
}


@pytest.mark.parametrize("label", list(DENSE_KINDS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_dense_equivalent_configs_match_sdpa(label: str, padding: str) -> None:
    kind, options = DENSE_KINDS[label]
    name = hf.register(kind, **options)
    batch = padded_batch(padding)
    res = compare_to(make_model("llama"), name, batch, "sdpa")
    keep = batch["attention_mask"].bool()
    assert_matches(f"{label}/{padding}", res["ours"], res["ref"], res["base"], keep)


@pytest.mark.parametrize(("family", "padding"), [("qwen2", "left"), ("mistral", "right")])
def test_other_families_and_custom_scaling(family: str, padding: str) -> None:
    name = hf.register("longnet", segment_lengths=[32], dilation_rates=[1])
    batch = padded_batch(padding)
    res = compare_to(make_model(family, seed=3), name, batch, "sdpa", scaling=0.29)
    assert_matches(family, res["ours"], res["ref"], res["base"], batch["attention_mask"].bool())


def _dilated_weights(N: int, H: int, causal: bool) -> torch.Tensor:
    # a key selected by two groups counts twice (LongNet's merge is one softmax over the multiset union)
    return reference.dilated_weights(N, H, [8, 16], [1, 2], is_causal=causal)


def _window_weights(N: int, H: int, causal: bool) -> torch.Tensor:
    layout = attn_sparse.local_window(N, 16, block_size=16)
    return reference.block_sparse_weights(layout.to_dense(), (16, 16), N, N, is_causal=causal)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize(
    ("kind", "options", "weights"),
    [
        ("longnet", {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}, _dilated_weights),
        (
            "block_sparse",
            {"pattern": "local_window", "pattern_options": {"window": 16}, "block_size": 16},
            _window_weights,
        ),
    ],
)
def test_sparse_configs_match_reference(kind, options, weights, padding: str) -> None:
    name = hf.register(kind, **options)
    ref_name = register_reference(f"test_ref_{kind}", weights)
    batch = padded_batch(padding, seq_len=40)
    res = compare_to(make_model("llama", seed=5), name, batch, ref_name)
    assert_matches(f"{kind}/{padding}", res["ours"], res["ref"], res["base"], batch["attention_mask"].bool())


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    import attn_core

    calls = []
    kernel = attn_core.dilated_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attn_core, "dilated_attention", counted)
    name = hf.register("longnet", segment_lengths=[8, 16], dilation_rates=[1, 2])
    batch = padded_batch("right")
    model = copy_model(make_model("llama"), name, torch.float32).train()
    plain = run(model, batch)
    assert len(calls) == 2  # one call per layer
    model.gradient_checkpointing_enable()
    checkpointed = run(model, batch)
    assert len(calls) == 2 + 4  # the backward recomputes each layer's attention
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for pname, g in plain[1].items():
        torch.testing.assert_close(checkpointed[1][pname], g, rtol=0, atol=0, msg=pname)


def test_attn_implementation_at_construction_and_longnet_dropout() -> None:
    from transformers import LlamaForCausalLM

    name = hf.register("longnet", segment_lengths=[16], dilation_rates=[2])
    model = make_model("llama", attention_dropout=0.5)
    built = LlamaForCausalLM._from_config(model.config, attn_implementation=name)
    assert built.config._attn_implementation == name
    batch = padded_batch("none")
    built.train()
    torch.manual_seed(0)
    first = built(**batch).logits
    torch.manual_seed(1)
    second = built(**batch).logits
    assert torch.isfinite(first).all() and not torch.equal(first, second)  # dropout is applied in training
    built.eval()
    assert torch.equal(built(**batch).logits, built(**batch).logits)  # and not in eval


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("longnet", DENSE_KINDS["longnet"][1]),
        ("block_sparse", {"pattern": "local_window", "pattern_options": {"window": 64}, "block_size": 16}),
        ("block_sparse", {}),  # no layout options and no mask to derive tiles from: every key
    ],
)
def test_bidirectional_config_runs_bidirectional(kind: str, options: dict) -> None:
    # config.is_causal=False makes transformers build a bidirectional mask; with padding its sdpa path
    # honours it (without padding sdpa falls back to the layer's causal flag, so the batch is padded)
    name = hf.register(kind, **options)
    batch = padded_batch("right")
    res = compare_to(make_model("llama", is_causal=False), name, batch, "sdpa")
    assert_matches(f"bidirectional {kind}", res["ours"], res["ref"], res["base"], batch["attention_mask"].bool())


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("longnet", {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}),
        ("block_sparse", {}),  # the tiles derived from the model's causal mask
    ],
)
def test_torch_compile_matches_eager(kind: str, options: dict) -> None:
    # torch.compile as HF training uses it (the whole model): dynamo traces the attention function and
    # AOT autograd the library's custom ops (aot_eager: the same tracing as inductor, no C++ build)
    name = hf.register(kind, **options)
    batch = padded_batch("left")
    eager = copy_model(make_model("llama", seed=7), name, torch.float32).train()
    compiled_model = copy_model(make_model("llama", seed=7), name, torch.float32).train()
    torch._dynamo.reset()
    compiled_model.forward = torch.compile(compiled_model.forward, backend="aot_eager")
    want = run(eager, batch)
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # the first call compiles, the second replays the compiled graph
        got = run(compiled_model, batch)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for pname, g in want[1].items():
            torch.testing.assert_close(got[1][pname], g, rtol=1e-5, atol=1e-5, msg=pname)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was compiled
