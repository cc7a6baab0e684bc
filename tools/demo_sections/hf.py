"""Demo section: a Hugging Face Llama on LongNet attention (dilated_attention_pytorch.hf).

A tiny Llama is built from a LlamaConfig (random weights, nothing downloaded) with
``attn_implementation=hf.register("longnet", ...)`` and fine-tuned with AdamW for a few steps,
on the CPU and, when present, on the GPU. Task: one fixed batch of rows, each a random 8-token
motif repeated 4 times; the loss counts only the repeats, which the model can predict by looking
8 tokens back (dilated attention with segments 16, 32 and rates 1, 2 reaches that far). The row
is ok when the last step's loss is below half the first step's (single-step losses on the same
batch, not means). The curves go to demo-output/hf_longnet_loss.png.

A second check: the dense-equivalent LongNet configuration (one segment as long as the sequence,
rate 1) must give the same logits and parameter gradients as transformers' own
attn_implementation="sdpa", within the project's 2x rule (float32 vs the float64 sdpa model,
baseline: sdpa in float32).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from demo import DemoRow
from transformers import LlamaConfig, LlamaForCausalLM

from attn_core import explain, last_backend
from attn_core.testing import assert_close_to_reference, max_abs_error, tolerance
from dilated_attention_pytorch import hf

VOCAB, MOTIF, REPEATS, ROWS = 16, 8, 4, 8
SEQ = MOTIF * REPEATS
SEG, RATES = [16, 32], [1, 2]
STEPS, LR = 30, 1e-2
HEADS, KV_HEADS, HIDDEN = 4, 2, 32


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,  # GQA: the integration passes K/V heads unrepeated
        max_position_embeddings=SEQ,
        attention_dropout=0.0,
    )


def _model(attn_implementation: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).to(device, dtype)
    model.set_attn_implementation(attn_implementation)
    return model


def _why(device: torch.device, segments: list[int], rates: list[int]) -> str:
    q = torch.zeros(ROWS, SEQ, HEADS, HIDDEN // HEADS, device=device)
    kv = torch.zeros(ROWS, SEQ, KV_HEADS, HIDDEN // HEADS, device=device)
    return explain(q, kv, kv, segments, rates, is_causal=True).why


def _fine_tune(name: str, device: torch.device) -> tuple[list[float], float, str]:
    """Per-step losses, ms per step and the backend that ran, for STEPS AdamW steps on one batch."""
    model = _model(name, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    motifs = torch.randint(0, VOCAB, (ROWS, MOTIF), generator=torch.Generator().manual_seed(1))
    input_ids = motifs.repeat(1, REPEATS).to(device)
    labels = input_ids.clone()
    labels[:, :MOTIF] = -100  # the first motif is random: only the repeats are predictable
    losses = []
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - t0) * 1e3 / STEPS, last_backend() or "?"


def _train_rows(ctx, devices: list[torch.device]) -> list[DemoRow]:
    name = hf.register("longnet", segment_lengths=SEG, dilation_rates=RATES)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    rows = []
    for device in devices:
        losses, ms, ran = _fine_tune(name, device)
        ax.plot(range(1, STEPS + 1), losses, marker=".", label=f"{device.type}: loss of each step")
        first, last = losses[0], losses[-1]
        finite = all(math.isfinite(x) for x in losses)
        rows.append(
            DemoRow(
                kind=f"HF Llama + hf.register('longnet') fine-tune, {STEPS} AdamW steps ({device.type})",
                backend=ran,
                why=_why(device, SEG, RATES),
                max_error=None,
                tolerance=None,
                time_ms=ms,
                ok=finite and last < 0.5 * first,
                note=f"loss of step 1 {first:.3f} -> of step {STEPS} {last:.3f} (single steps, one fixed batch; "
                f"chance ln {VOCAB} = {math.log(VOCAB):.3f}); ms per training step",
            )
        )
    ax.axhline(math.log(VOCAB), color="gray", linestyle="--", label=f"chance ln {VOCAB}")
    ax.set_xlabel("AdamW step")
    ax.set_ylabel("cross-entropy on the repeats")
    ax.set_title(f"tiny HF Llama on LongNet attention (segments {SEG}, rates {RATES})")
    ax.legend()
    ctx.save_plot(fig, "hf_longnet_loss")
    plt.close(fig)
    return rows


def _logits_and_grads(model: LlamaForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """[logits (B, N, V), all parameter gradients flattened into one vector] of the LM loss."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    return [out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])]


def _dense_rows(device: torch.device) -> list[DemoRow]:
    # one segment covering the whole sequence at rate 1 is dense causal attention: same math as sdpa
    dense = hf.register("longnet", segment_lengths=[SEQ], dilation_rates=[1])
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(2)).to(device)
    ref_model = _model("sdpa", device, torch.float64)
    ref = _logits_and_grads(ref_model, input_ids)
    base = _logits_and_grads(copy.deepcopy(ref_model).to(torch.float32), input_ids)
    tested = copy.deepcopy(ref_model).to(torch.float32)
    tested.set_attn_implementation(dense)
    t0 = time.perf_counter()
    got = _logits_and_grads(tested, input_ids)
    ms = (time.perf_counter() - t0) * 1e3
    ran = last_backend() or "?"
    rows = []
    for i, what in enumerate(("logits", "parameter grads")):
        err, tol = max_abs_error(got[i], ref[i]), tolerance(got[i], ref[i], base[i])
        note = "float32 vs float64 sdpa model; baseline: sdpa in float32"
        try:
            assert_close_to_reference(what, got[i], ref[i], base[i])
            ok = True
        except AssertionError as exc:
            ok, note = False, str(exc)
        rows.append(
            DemoRow(
                kind=f"HF Llama longnet [{SEQ}]/[1] == sdpa: {what} ({device.type})",
                backend=ran,
                why=_why(device, [SEQ], [1]),
                max_error=err,
                tolerance=tol,
                time_ms=ms if i == 0 else None,
                ok=ok,
                note=note,
            )
        )
    return rows


def run(ctx) -> list[DemoRow]:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if ctx.num_gpus else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only add sync cost on the CPU
    try:
        rows = _train_rows(ctx, devices)
        for device in devices:
            rows += _dense_rows(device)
        return rows
    finally:
        torch.set_num_threads(threads)
