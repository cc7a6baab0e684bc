"""Checks run inside each gloo rank (spawned by integration_tests/harness.py): a Llama sharded over the
ring equals the same model run whole in one process, in logits, loss and every gradient."""

from __future__ import annotations

import pytest
import torch
from hf_models import assert_matches, copy_model, make_model, padded_batch

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
