"""Checks run inside each gloo rank (spawned by integration_tests/harness.py): a Llama sharded over the
ring equals the same model run whole in one process, in logits, loss and every gradient; a packed
row sharded over the ring equals each of its documents run alone."""

from __future__ import annotations

import pytest
import torch
from hf_models import assert_matches, copy_model, make_model, packed_batch, padded_batch, run_documents

from attn_core.testing import assert_close_to_reference
from dilated_attention_pytorch import hf

DILATED = {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}


def _whole(model: torch.nn.Module, impl: str, dtype: torch.dtype, batch: dict) -> tuple:
    m = copy_model(model, impl, dtype)
    out = m(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, out.loss.detach()


def _sharded(model: torch.nn.Module, impl: str, batch: dict, layout: str) -> tuple:
    m = copy_model(model, impl, torch.float32)
    shard = hf.shard_batch(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"], layout=layout)
    out = m(**shard)
    out.loss.backward()
    hf.sync_gradients(m)
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return hf.gather_logits(out.logits, layout=layout), grads, hf.reduce_loss(out.loss)


def check_ring_kinds(rank: int, world_size: int) -> list[str]:
    torch.manual_seed(0)
    model = make_model("llama", seed=11)
    done = []
    cases = [
        # kind, options, single-process implementation it must equal, shard layout, padding
        ("ring", {"layout": "zigzag"}, "sdpa", "zigzag", "none"),
        ("ring", {"layout": "contiguous"}, "sdpa", "contiguous", "none"),
        ("ring_dilated", DILATED, hf.register("longnet", **DILATED), "contiguous", "right"),
    ]
    for kind, options, whole_impl, layout, padding in cases:
        batch = padded_batch(padding, seq_len=24)
        ref = _whole(model, whole_impl, torch.float64, batch)
        base = _whole(model, whole_impl, torch.float32, batch)
        ours = _sharded(model, hf.register(kind, **options), batch, layout)
        label = f"{kind}/{layout} W={world_size}"
        keep = batch["attention_mask"].bool()
        assert_matches(label, ours[:2], ref[:2], base[:2], keep)
        assert_close_to_reference(f"{label} loss", ours[2], ref[2], base[2])
        done.append(label)
    # a rank given the whole sequence instead of its zigzag shard is refused on every rank
    ring = copy_model(model, hf.register("ring", layout="zigzag"), torch.float32)
    with pytest.raises(ValueError, match="shard_batch"):
        ring(**padded_batch("none", seq_len=24))
    done.append("unsharded batch refused")
    return done


# 24 tokens; the 9-token document (5..14) crosses the shard boundaries of both layouts at W = 2 and 3
PACKED_LENGTHS = [5, 9, 4, 6]


def _documents_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # the packed row's mean loss as transformers defines it for DataCollatorWithFlattening's labels
    # (-100 at each document's first token: no prediction across a boundary), in float64
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=-100)


def check_ring_packed(rank: int, world_size: int) -> list[str]:
    torch.manual_seed(0)
    model = make_model("llama", seed=12)
    batch, docs = packed_batch(PACKED_LENGTHS, seed=5)
    ref = run_documents(copy_model(model, "sdpa", torch.float64), docs)
    base = run_documents(copy_model(model, "sdpa", torch.float32), docs)
    ref_loss, base_loss = (_documents_loss(r[0], batch["labels"]) for r in (ref, base))
    cu = torch.tensor([0, *PACKED_LENGTHS]).cumsum(0)
    done = []
    for layout, source in (("zigzag", "position_ids"), ("contiguous", "cu_seqlens")):
        m = copy_model(model, hf.register("ring", layout=layout), torch.float32)
        if source == "position_ids":  # DataCollatorWithFlattening's row: labels already cut at document starts
            shard = hf.shard_batch(
                batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], layout=layout
            )
        else:  # plain labels: shard_batch cuts them at the document starts
            shard = hf.shard_batch(batch["input_ids"], batch["input_ids"], cu_seqlens=cu, layout=layout)
        assert shard["cu_seq_lens_q"].tolist() == cu.tolist()  # the whole row's offsets on every rank
        out = m(**shard)
        out.loss.backward()
        hf.sync_gradients(m)
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        logits = hf.gather_logits(out.logits, layout=layout)
        label = f"packed ring/{layout} from {source} W={world_size}"
        assert_matches(label, (logits, grads), ref, base)
        assert_close_to_reference(f"{label} loss", hf.reduce_loss(out.loss), ref_loss, base_loss)
        done.append(label)
    # packing matters: one causal pass over the whole row is other math
    whole = copy_model(model, "sdpa", torch.float64)(input_ids=batch["input_ids"]).logits
    assert (whole - ref[0]).abs().max() > 1e-3
    # offsets of this rank's shard instead of the whole row are refused on every rank, naming the mistake
    ring = copy_model(model, hf.register("ring"), torch.float32)
    shard = hf.shard_batch(batch["input_ids"], cu_seqlens=cu)
    n = shard["input_ids"].shape[1]
    local = torch.tensor([0, n // 2, n], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"whole {n * world_size}-token sequence over {world_size} ranks"):
        ring(**{**shard, "cu_seq_lens_q": local, "cu_seq_lens_k": local})
    done.append("shard offsets refused")
    return done
