"""Demo section: a LongNetLM learns a long-range copy task; gradient checkpointing is exact; the
model compiles whole under torch.compile and matches eager.

Task: 17 random tokens, then the same 17 again. Predicting token p+1 in the second half means
reading position p-16, which only the long dilated group (segment 64, rate 4) reaches in one
layer, so falling loss on the copied half shows dilated attention carrying information across
the sequence. The loss curve goes to demo-output/longnet_loss.png. The row is ok when the mean
loss on the copied half over the last 10 steps falls below half of chance level (ln vocab).
"""

from __future__ import annotations

import math
import time

import torch
from demo import DemoRow
from torch.nn.functional import cross_entropy

from attn_core import LongNetLM, explain, last_backend

VOCAB, HALF, SEG, RATES = 16, 17, [8, 16, 64], [1, 2, 4]
STEPS, BATCH = 250, 32


def _batch(g: torch.Generator, device: torch.device) -> torch.Tensor:
    half = torch.randint(0, VOCAB, (BATCH, HALF), generator=g)
    return torch.cat([half, half], dim=1).to(device)


def _copy_loss(lm: LongNetLM, seq: torch.Tensor) -> torch.Tensor:
    logits = lm(seq[:, :-1])
    return cross_entropy(logits[:, HALF - 1 :].flatten(0, 1), seq[:, HALF:].flatten())


def _train(ctx, device: torch.device) -> DemoRow:
    torch.manual_seed(0)
    lm = LongNetLM(VOCAB, 32, 4, 1, SEG, RATES, dropout=0.0, device=device)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = _copy_loss(lm, _batch(g, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ms = (time.perf_counter() - t0) * 1e3 / STEPS
    window = 10  # single steps are noisy: compare means over the first and the last steps
    start, end = sum(losses[:window]) / window, sum(losses[-window:]) / window
    chance = math.log(VOCAB)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(losses, label="copied half (each step's batch)", alpha=0.5)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(STEPS)
    ]
    ax.plot(smooth, label=f"mean of the last {window} steps")
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance ln {VOCAB}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"LongNetLM copy task (distance {HALF - 1}, segments {SEG}, rates {RATES})")
    ax.legend()
    ctx.save_plot(fig, "longnet_loss")
    plt.close(fig)

    probe = torch.zeros(BATCH, 2 * HALF - 1, 4, 8, device=device)
    choice = explain(probe, probe, probe, SEG, RATES, is_causal=True)
    return DemoRow(
        kind=f"LongNetLM copy task, {STEPS} steps",
        backend=last_backend() or "?",
        why=choice.why,
        max_error=None,
        tolerance=None,
        time_ms=ms,
        ok=end < 0.5 * chance,
        note=f"mean loss of the first {window} steps {start:.3f} -> of the last {window} {end:.3f} "
        f"(chance {chance:.3f}); ms per training step",
    )


def _checkpointing(device: torch.device) -> DemoRow:
    # Same weights, same seed, dropout on: recomputed layers must give the same gradients.
    grads = []
    seq = _batch(torch.Generator().manual_seed(2), device)
    for ckpt in (False, True):
        torch.manual_seed(0)
        lm = LongNetLM(
            VOCAB, 32, 4, 2, SEG, RATES, dropout=0.1, attention_dropout=0.1, gradient_checkpointing=ckpt, device=device
        )
        torch.manual_seed(3)
        _copy_loss(lm, seq).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    err = float((grads[0] - grads[1]).abs().max())
    tol = 1e-5 * float(grads[0].abs().max())
    probe = torch.zeros(BATCH, 2 * HALF - 1, 4, 8, device=device)
    choice = explain(probe, probe, probe, SEG, RATES, is_causal=True, dropout_p=0.1)
    return DemoRow(
        kind="LongNetLM gradient checkpointing",
        backend=last_backend() or "?",
        why=choice.why,
        max_error=err,
        tolerance=tol,
        time_ms=None,
        ok=err <= tol,
        note="same weights and RNG, with vs without torch.utils.checkpoint: max |grad difference| over all parameters",
    )


def _compiled(device: torch.device) -> DemoRow:
    # torch.compile traces the whole model (fullgraph: any graph break raises): the dilated
    # attention runs as custom ops with their autograd formula; loss and gradients match eager
    torch.manual_seed(0)
    lm = LongNetLM(VOCAB, 32, 4, 2, SEG, RATES, dropout=0.0, device=device)
    seq = _batch(torch.Generator().manual_seed(4), device)
    results = []
    t0 = 0.0
    for compiled in (False, True):
        lm.zero_grad()
        fn = torch.compile(lm, backend="aot_eager", fullgraph=True) if compiled else lm
        t0 = time.perf_counter()
        logits = fn(seq[:, :-1])
        loss = cross_entropy(logits[:, HALF - 1 :].flatten(0, 1), seq[:, HALF:].flatten())
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in lm.parameters()])))
    ms = (time.perf_counter() - t0) * 1e3
    err = max(abs(results[0][0] - results[1][0]), float((results[0][1] - results[1][1]).abs().max()))
    tol = 1e-5 * max(1.0, float(results[0][1].abs().max()))
    probe = torch.zeros(BATCH, 2 * HALF - 1, 4, 8, device=device)
    return DemoRow(
        kind="LongNetLM torch.compile",
        backend=last_backend() or "?",
        why=explain(probe, probe, probe, SEG, RATES, is_causal=True).why,
        max_error=err,
        tolerance=tol,
        time_ms=ms,
        ok=err <= tol,
        note="fullgraph=True (no graph break), aot_eager backend; max |difference| of loss and parameter grads vs eager; ms: first call (trace + run)",
    )


def run(ctx) -> list[DemoRow]:
    device = torch.device(ctx.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # many tiny ops: intra-op threads only add sync cost
    try:
        return [_train(ctx, device), _checkpointing(device), _compiled(device)]
    finally:
        torch.set_num_threads(threads)
