"""What the HF integration cannot compute exactly raises a clear error; bad register() arguments too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hf_models import assert_matches, copy_model, make_model, packed_batch, padded_batch, run, run_documents
from transformers import AttentionInterface

import attn_sparse
from attn_core import reference
from dilated_attention_pytorch import hf
from dilated_attention_pytorch.hf import PaddingMask

LONGNET = {"segment_lengths": [16], "dilation_rates": [1]}


@pytest.fixture
def world1(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kind", "options", "error", "match"),
    [
        ("flash", {}, ValueError, "kind must be one of"),
        ("longnet", {"segment_lengths": [8]}, TypeError, "missing required option"),
        ("longnet", {**LONGNET, "window": 3}, TypeError, "unknown option"),
        ("longnet", {"segment_lengths": [8], "dilation_rates": [3]}, ValueError, "8"),
        ("longnet", {**LONGNET, "head_mode": "some"}, ValueError, "head_mode"),
        ("longnet", {**LONGNET, "backend": "cuda"}, ValueError, "backend"),
        ("block_sparse", {"pattern": "diagonal"}, ValueError, "pattern must be one of"),
        ("block_sparse", {"pattern": "local_window", "pattern_options": {"seq_len": 4}}, ValueError, "seq_len"),
        ("block_sparse", {"pattern": "causal", "pattern_options": [1]}, TypeError, "pattern_options must be a dict"),
        ("block_sparse", {"pattern": "local_window", "pattern_options": {"width": 4}}, TypeError, "width"),
        ("block_sparse", {"pattern": "local_window", "pattern_options": {"window": -1}}, ValueError, "window"),
        ("block_sparse", {"pattern": "causal", "block_size": 24}, ValueError, "powers of two"),
        ("block_sparse", {"block_size": 64}, TypeError, "give pattern"),  # nothing for it to shape
        ("block_sparse", {"pattern_options": {"window": 2}}, TypeError, "give pattern"),
        ("block_sparse", {"layout": "causal"}, TypeError, "BlockLayout"),
        ("block_sparse", {"layout": attn_sparse.causal(32, block_size=16), "pattern": "causal"}, TypeError, "either"),
        ("ring", {"group": 0}, TypeError, "ProcessGroup"),
        ("ring", {"layout": "striped"}, ValueError, "layout"),
        ("ring_dilated", {**LONGNET, "layout": "zigzag"}, TypeError, "unknown option"),
    ],
)
def test_register_rejects_bad_arguments(kind: str, options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        hf.register(kind, **options)


def test_register_names_are_stable_and_distinct() -> None:
    a = hf.register("longnet", **LONGNET)
    assert a == hf.register("longnet", dilation_rates=[1], segment_lengths=[16])
    assert a != hf.register("longnet", segment_lengths=[16], dilation_rates=[2])
    assert a != hf.register("ring_dilated", **LONGNET)
    assert a in AttentionInterface()


def test_without_transformers_import_works_and_register_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "import sys, dilated_attention_pytorch, dilated_attention_pytorch.hf; "
        "assert 'transformers' not in sys.modules, 'imported transformers eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r"dilated-attention-pytorch\[hf\]"):
        hf.register("longnet", **LONGNET)


def test_longnet_refuses_windows_it_cannot_apply() -> None:
    name = hf.register("longnet", **LONGNET)
    model = copy_model(make_model("mistral", sliding_window=8), name, torch.float32)
    with pytest.raises(ValueError, match=r"window_size=\(7, 0\) over 24 tokens.*register 'block_sparse'"):
        model(**padded_batch("none"))
    # a window that covers the whole sequence masks nothing: the model runs
    wide = copy_model(make_model("mistral", sliding_window=24), name, torch.float32)
    assert torch.isfinite(wide(**padded_batch("left")).logits).all()


def test_qwen2_sliding_layers_are_refused_by_longnet_and_full_layers_run() -> None:
    name = hf.register("longnet", **LONGNET)
    sliding = copy_model(
        make_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), name, torch.float32
    )
    with pytest.raises(ValueError, match="sliding window"):
        sliding(**padded_batch("none"))
    # use_sliding_window with every layer below max_window_layers has no sliding layer: exact, runs
    full = copy_model(
        make_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2), name, torch.float32
    )
    assert torch.isfinite(full(**padded_batch("left")).logits).all()


def _packed_ids() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (1, 24), position_ids of documents of 10 and 14 tokens, their cu_seq_lens."""
    ids = padded_batch("none", batch=1)["input_ids"]
    return ids, torch.cat([torch.arange(10), torch.arange(14)])[None], torch.tensor([0, 10, 24], dtype=torch.int32)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        # two packed rows: documents must sit in one row
        ({"input_ids": "ids2", "position_ids": "pos2", "use_cache": False}, r"B == 1.*got B=2"),
        ({"input_ids": "ids2", "cu_seq_lens_q": "cu", "cu_seq_lens_k": "cu"}, "one row.*B=2"),
        # with a KV cache transformers' mask does not separate documents: nothing is guessed
        ({"position_ids": "pos"}, "use_cache=False"),
        ({"position_ids": "pos", "cu_seq_lens_q": "cu", "cu_seq_lens_k": "cu_other"}, "differ"),
        ({"position_ids": "pos", "cu_seq_lens_q": "cu_other", "cu_seq_lens_k": "cu_other"}, r"\[0, 12, 24\].*differ"),
        ({"cu_seq_lens_q": "cu"}, "cu_seq_lens_k must be"),
        ({"cu_seq_lens_q": "cu_float", "cu_seq_lens_k": "cu_float"}, "integer tensor"),
        ({"cu_seq_lens_q": "cu_short", "cu_seq_lens_k": "cu_short"}, "cu_seq_lens_q/k: .*24"),
        ({"cu_seq_lens_q": "cu_long", "cu_seq_lens_k": "cu_long"}, r"must lie in \[0, 24\]"),
    ],
)
def test_packed_sequences_that_cannot_be_computed_exactly_are_refused(inputs: dict, match: str) -> None:
    model = copy_model(make_model("llama"), hf.register("longnet", **LONGNET), torch.float32)
    ids, pos, cu = _packed_ids()
    values = {
        "ids2": ids.expand(2, -1),
        "pos2": pos.expand(2, -1),
        "pos": pos,
        "cu": cu,
        "cu_other": torch.tensor([0, 12, 24], dtype=torch.int32),
        "cu_float": cu.float(),
        "cu_short": torch.tensor([0, 10, 20], dtype=torch.int32),
        "cu_long": torch.tensor([0, 10, 2**32 + 24]),
    }
    kwargs = {"input_ids": ids, **{k: values.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}}
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_packed_position_ids_with_an_attention_mask_are_one_sequence_as_in_transformers() -> None:
    # transformers reads restarting position_ids as packed only without a 2-d attention_mask
    ids, pos, _ = _packed_ids()
    model = make_model("llama")
    ours = copy_model(model, hf.register("longnet", segment_lengths=[32], dilation_rates=[1]), torch.float64)
    batch = {"input_ids": ids, "position_ids": pos, "attention_mask": torch.ones_like(ids), "use_cache": False}
    torch.testing.assert_close(ours(**batch).logits, copy_model(model, "sdpa", torch.float64)(**batch).logits)


def test_unsupported_requests_are_refused() -> None:
    name = hf.register("block_sparse")
    model = copy_model(make_model("llama", attention_dropout=0.1), name, torch.float32)
    batch = padded_batch("right")
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch, output_attentions=True)
    with pytest.raises(ValueError, match="custom attention mask"):
        model(input_ids=batch["input_ids"], attention_mask=torch.ones(2, 1, 24, 24, dtype=torch.bool))
    out = model(input_ids=batch["input_ids"][:, :20], use_cache=True)  # a prefill runs
    with pytest.raises(ValueError, match="KV cache"):
        model(input_ids=batch["input_ids"][:, 20:21], past_key_values=out.past_key_values)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(**batch)


def test_attention_function_refuses_softcap_bias_and_conflicting_causality() -> None:
    fn = AttentionInterface()[hf.register("longnet", **LONGNET)]
    module = torch.nn.Module()
    q = torch.randn(1, 4, 16, 8)
    k = v = torch.randn(1, 2, 16, 8)
    out, weights = fn(module, q, k, v, None)
    assert out.shape == (1, 16, 4, 8) and weights is None
    with pytest.raises(ValueError, match="softcap"):
        fn(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="position_bias"):
        fn(module, q, k, v, None, position_bias=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="is_causal=True"):
        fn(module, q, k, v, PaddingMask(None, is_causal=False, exact=True), is_causal=True)
    with pytest.raises(ValueError, match="beyond causal"):  # a mask rule the mask function did not recognise
        fn(module, q, k, v, PaddingMask(None, is_causal=True, exact=False))


def test_attention_function_without_a_mask_reads_the_layer_window() -> None:
    # no mask from transformers: a causal layer's sliding_window W keeps q - W < k <= q, as every
    # transformers path does; a bidirectional one is ambiguous there (its masks and flash differ)
    fn = AttentionInterface()[hf.register("block_sparse")]
    module = torch.nn.Module()
    q = torch.randn(1, 4, 16, 8, dtype=torch.float64)
    k = v = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    out, _ = fn(module, q, k, v, None, sliding_window=5)
    expected, _ = reference.dense_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, window_size=(4, 0)
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="ambiguous"):
        fn(module, q, k, v, None, sliding_window=5, is_causal=False)
    with pytest.raises(ValueError, match="sliding_window must be an int"):
        fn(module, q, k, v, None, sliding_window=0)


def test_ring_refuses_padding_and_dropout(world1: None) -> None:
    name = hf.register("ring")
    model = copy_model(make_model("llama"), name, torch.float32)
    batch = hf.shard_batch(padded_batch("none")["input_ids"], layout="zigzag")
    assert torch.isfinite(model(**batch).logits).all()
    with pytest.raises(ValueError, match="padding"):
        model(**padded_batch("left"))
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model.train()(**batch)


@pytest.mark.parametrize("kind", ["ring", "ring_dilated"])
def test_ring_kinds_refuse_windows_and_packed_sequences_not_cut_by_shard_batch(kind: str, world1: None) -> None:
    layout = "zigzag" if kind == "ring" else "contiguous"
    name = hf.register(kind, **({} if kind == "ring" else LONGNET))
    sliding = copy_model(make_model("mistral", sliding_window=8), name, torch.float32)
    with pytest.raises(ValueError, match=r"sliding window.*cannot apply"):
        sliding(**hf.shard_batch(padded_batch("none")["input_ids"], layout=layout))
    model = copy_model(make_model("llama"), name, torch.float32)
    ids, pos, cu = _packed_ids()
    with pytest.raises(ValueError, match=f"packed sequences .* not supported by '{kind}'.*shard_batch"):
        model(input_ids=ids, position_ids=pos, use_cache=False)
    # offsets with positions that do not restart in each document (not from shard_batch)
    match = "position_ids are not .* packed as cu_seq_lens_q/k say" if kind == "ring" else "not supported by"
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    if kind == "ring_dilated":  # ring dilated attention takes no document offsets, however they come
        with pytest.raises(ValueError, match=r"packed sequences .* not supported by 'ring_dilated'.*register 'ring'"):
            model(**hf.shard_batch(ids, position_ids=pos, layout=layout))


def test_shard_batch_packs_documents_as_data_collator_with_flattening(world1: None) -> None:
    batch, docs = packed_batch([7, 1, 10, 6], seed=4)  # a one-token document too
    n = batch["input_ids"].shape[1]
    cu = torch.tensor([0, 7, 8, 18, 24])
    from_positions = hf.shard_batch(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
    from_offsets = hf.shard_batch(batch["input_ids"], batch["input_ids"], cu_seqlens=cu)
    # empty documents (repeated offsets) are the same packing
    with_empty = hf.shard_batch(
        batch["input_ids"], batch["input_ids"], cu_seqlens=torch.tensor([0, 7, 7, 8, 18, 24, 24])
    )
    for got in (from_positions, from_offsets):
        assert got["cu_seq_lens_q"].tolist() == got["cu_seq_lens_k"].tolist() == cu.tolist()
        assert got["cu_seq_lens_q"].dtype == torch.int32
        assert torch.equal(got["position_ids"], batch["position_ids"])  # W = 1: the shard is the row
        # token t predicts t + 1 inside its document only: the last token of each document predicts nothing
        expected = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])[None]
        assert torch.equal(got["labels"], expected) and torch.equal(got["shift_labels"], expected)
        assert int(got["num_items_in_batch"]) == n - len(docs)
    assert all(torch.equal(with_empty[k], from_offsets[k]) for k in ("labels", "position_ids", "input_ids"))
    # a row that is not packed carries no offsets
    assert "cu_seq_lens_q" not in hf.shard_batch(batch["input_ids"], position_ids=torch.arange(n)[None])


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"input_ids": "ids2", "cu_seqlens": "cu"}, "one row.*B=2"),
        ({"input_ids": "ids2", "position_ids": "pos2"}, r"B == 1.*got B=2"),
        ({"cu_seqlens": "cu_float"}, "integer tensor"),
        ({"cu_seqlens": "cu_short"}, "cu_seqlens: .*24"),
        ({"cu_seqlens": "cu_long"}, r"must lie in \[0, 24\]"),
        ({"cu_seqlens": "cu_other", "position_ids": "pos"}, r"\[0, 12, 24\] and the documents .* differ"),
        ({"position_ids": "pos_from_3"}, "count 0, 1, 2, ... along each document"),
        ({"position_ids": "arange_from_3"}, "count 0, 1, 2, ... along each row"),
        ({"cu_seqlens": "cu", "attention_mask": "padded"}, "no padding"),
    ],
)
def test_shard_batch_refuses_packing_it_cannot_carry(inputs: dict, match: str, world1: None) -> None:
    ids, pos, cu = _packed_ids()
    padded = torch.ones(1, 24, dtype=torch.long)
    padded[0, -2:] = 0
    values = {
        "ids2": ids.expand(2, -1),
        "pos2": pos.expand(2, -1),
        "pos": pos,
        "pos_from_3": pos + 3,
        "arange_from_3": torch.arange(3, 27)[None],
        "cu": cu,
        "cu_other": torch.tensor([0, 12, 24]),
        "cu_float": cu.float(),
        "cu_short": torch.tensor([0, 10, 20]),
        "cu_long": torch.tensor([0, 10, 2**32 + 24]),
        "padded": padded,
    }
    kwargs = {"input_ids": ids, **{k: values[v] for k, v in inputs.items()}}
    with pytest.raises(ValueError, match=match):
        hf.shard_batch(**kwargs)


def test_ring_helpers_validate_and_need_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf.shard_batch(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        hf.shard_batch(torch.zeros(8, dtype=torch.long))


def test_packed_ring_offsets_reach_layers_recomputed_by_gradient_checkpointing(
    world1: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the offsets travel as model keywords, so a layer recomputed in backward sees them again
    import attn_ring

    batch, docs = packed_batch([9, 6, 9], seed=6)
    model = make_model("llama", seed=2)
    ref = run_documents(copy_model(model, "sdpa", torch.float64), docs)
    base = run_documents(copy_model(model, "sdpa", torch.float32), docs)
    ring = copy_model(model, hf.register("ring"), torch.float32)
    getattr(ring, "activation_checkpointing_enable", ring.gradient_checkpointing_enable)()
    ring.train()
    offsets = []
    kernel = attn_ring.ring_attention

    def recorded(*args, **kwargs):
        offsets.append(kwargs["cu_seqlens"].tolist())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attn_ring, "ring_attention", recorded)
    ours = run(ring, hf.shard_batch(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"]))
    assert offsets == [[0, 9, 15, 24]] * 4  # 2 layers, each run in forward and again in backward
    assert_matches("packed ring, gradient checkpointing", ours, ref, base)
