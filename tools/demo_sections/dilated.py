"""Demo section: attn_core.dilated_attention ("auto") against the float64 reference.

For a few LongNet configurations (both head modes, causal, GQA, padding, N not a multiple of
any segment) it runs forward + backward with backend="auto", reports which backend ran and
why (attn_core.explain), and checks out, dq, dk, dv against attn_core.reference in float64
with the project's rule (error <= 2x plain PyTorch in the same dtype). Saves a PNG of the
dilated attention pattern (which keys each query sees, per head).
"""

from __future__ import annotations

import time

import torch
from demo import DemoRow

from attn_core import dilated_attention, explain, last_backend, reference
from attn_core.testing import assert_close_to_reference, max_abs_error, tolerance

# name, (B, N, H, Hkv, D), segment_lengths, dilation_rates, head_mode, is_causal, padding
CONFIGS = [
    ("all", (1, 512, 8, 8, 32), [32, 64, 128], [1, 2, 4], "all", False, False),
    ("all causal GQA pad N=500", (2, 500, 8, 2, 32), [32, 64, 128], [1, 2, 4], "all", True, True),
    ("split causal H=6 G=4", (1, 384, 6, 3, 32), [16, 32, 64, 128], [1, 2, 4, 8], "split", True, False),
]


def _grad_run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach(), *grads]


def _check(name, dtype, ctx_device):
    _, (B, N, H, Hkv, D), seg, rates, mode, causal, padding = next(c for c in CONFIGS if c[0] == name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g).to(ctx_device, dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(ctx_device, dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(ctx_device, dtype)
    dout = torch.randn(B, N, H, D, generator=g).to(ctx_device, dtype)
    mask = None
    if padding:
        lengths = torch.tensor([N - 37 * i for i in range(B)])
        mask = (torch.arange(N)[None, :] >= lengths[:, None]).to(ctx_device)
    kw = {"is_causal": causal, "key_padding_mask": mask, "head_mode": mode}

    choice = explain(q, k, v, seg, rates, **kw)
    run_auto = lambda a, b, c: dilated_attention(a, b, c, seg, rates, **kw)  # noqa: E731
    _grad_run(run_auto, q, k, v, dout)  # warm-up: time the second call
    if q.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = _grad_run(run_auto, q, k, v, dout)
    if q.is_cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    ran = last_backend() or "?"
    ref = _grad_run(lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, **kw)[0], q, k, v, dout)
    base = _grad_run(
        lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, dtype=dtype, **kw)[0].to(dtype), q, k, v, dout
    )
    rows = []
    for label, idx in (("fwd", [0]), ("bwd", [1, 2, 3])):
        ok, errs, tols, notes = True, [], [], []
        for i in idx:
            tensor = ("out", "dq", "dk", "dv")[i]
            errs.append(max_abs_error(got[i], ref[i]))
            tols.append(tolerance(got[i], ref[i], base[i]))
            try:
                assert_close_to_reference(tensor, got[i], ref[i], base[i])
            except AssertionError as exc:
                ok = False
                notes.append(str(exc))
        worst = max(range(len(errs)), key=lambda j: errs[j] / max(tols[j], 1e-30))
        rows.append(
            DemoRow(
                kind=f"dilated {label} {name} {str(dtype).removeprefix('torch.')}",
                backend=ran,
                why=choice.why + ("" if ran == choice.backend else f" (explain said {choice.backend})"),
                max_error=errs[worst],
                tolerance=tols[worst],
                time_ms=ms if label == "fwd" else None,
                ok=ok and ran == choice.backend,
                note="; ".join(notes) or "tol = max(2x plain PyTorch error, 8-ulp floor); ms = fwd+bwd",
            )
        )
    return rows, choice


def _plot(ctx) -> None:
    import matplotlib.pyplot as plt

    N, H, seg, rates = 32, 4, [8, 16, 32], [1, 2, 4]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for j, ax in enumerate(axes):
        w = reference.dilated_weights(N, H, seg, rates, is_causal=False)[j]
        ax.imshow(w.numpy(), cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(f"head {j} (offset j mod r)")
        ax.set_xlabel("key")
        if j == 0:
            ax.set_ylabel("query")
    fig.suptitle(f"dilated attention key multiplicity, segments {seg}, rates {rates} (head_mode='all')")
    ctx.save_plot(fig, "dilated_pattern")
    plt.close(fig)


def run(ctx) -> list[DemoRow]:
    device = torch.device(ctx.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows: list[DemoRow] = []
    for dtype in dtypes:
        for name, *_ in CONFIGS:
            r, choice = _check(name, dtype, device)
            rows.extend(r)
            if dtype == dtypes[0] and name == CONFIGS[1][0]:
                ctx.notes.append(
                    f"dilated_attention explain() for '{name}' on {device}: " + str(choice).replace("\n", " |")
                )
    _plot(ctx)
    return rows
