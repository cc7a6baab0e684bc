"""A LongNet-attention Llama learns a toy task: the loss falls over 20 AdamW steps."""

from __future__ import annotations

import torch
from hf_models import VOCAB, copy_model, make_model

from dilated_attention_pytorch import hf


def test_longnet_llama_trains_on_a_copy_task() -> None:
    name = hf.register("longnet", segment_lengths=[16, 32], dilation_rates=[1, 2])
    model = copy_model(make_model("llama", seed=7), name, torch.float32).train()
    gen = torch.Generator().manual_seed(0)
    # each row repeats an 8-token motif: after the first copy every token is predictable from 8 back
    motif = torch.randint(0, VOCAB, (4, 8), generator=gen)
    input_ids = motif.repeat(1, 4)  # (4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses[0]:.3f} -> {losses[-1]:.3f}"
