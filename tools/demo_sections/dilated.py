"""Demo section: attn_core.dilated_attention ("auto") against the float64 reference.

For a few LongNet configurations (both head modes, causal, GQA, padding, N not a multiple of
any segment, packed documents of varied length) it runs forward + backward with backend="auto", reports which backend ran and
why (attn_core.explain), and checks out, dq, dk, dv against attn_core.reference in float64
with the project's rule (error <= 2x plain PyTorch in the same dtype). Saves a PNG of the
dilated attention pattern (which keys each query sees, per head).
"""

from __future__ import annotations

import torch
from demo import DemoRow, grad_run, reference_rows, timed_grad_run

from attn_core import dilated_attention, explain, last_backend, reference

# name, (B, N, H, Hkv, D), segment_lengths, dilation_rates, head_mode, is_causal, padding,
# packed document lengths (None: one sequence per batch row)
CONFIGS = [
    ("all", (1, 512, 8, 8, 32), [32, 64, 128], [1, 2, 4], "all", False, False, None),
    ("all causal GQA pad N=500", (2, 500, 8, 2, 32), [32, 64, 128], [1, 2, 4], "all", True, True, None),
    ("split causal H=6 G=4", (1, 384, 6, 3, 32), [16, 32, 64, 128], [1, 2, 4, 8], "split", True, False, None),
    (
        "all causal GQA 6 packed docs N=460",
        (1, 460, 8, 2, 32),
        [32, 64, 128],
        [1, 2, 4],
        "all",
        True,
        False,
        [1, 200, 31, 128, 0, 100],
    ),
]


def _check(name, dtype, ctx_device):
    _, (B, N, H, Hkv, D), seg, rates, mode, causal, padding, docs = next(c for c in CONFIGS if c[0] == name)
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
    if docs is not None:  # documents packed along N: attention and segments restart at each one
        kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32).to(ctx_device)

    choice = explain(q, k, v, seg, rates, **kw)
    run_auto = lambda a, b, c: dilated_attention(a, b, c, seg, rates, **kw)  # noqa: E731
    got, ms = timed_grad_run(run_auto, q, k, v, dout)
    ran = last_backend() or "?"
    ref = grad_run(lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, **kw)[0], q, k, v, dout)
    base = grad_run(
        lambda a, b, c: reference.dilated_attention(a, b, c, seg, rates, dtype=dtype, **kw)[0].to(dtype), q, k, v, dout
    )
    rows = reference_rows(
        f"dilated {{label}} {name} {str(dtype).removeprefix('torch.')}",
        got,
        ref,
        base,
        choice=choice,
        ran=ran,
        time_ms=ms,
        note="tol = max(2x plain PyTorch error, ulp floor: 8, float32 32); ms = fwd+bwd",
    )
    return rows, choice


def _plot(ctx) -> None:
    import matplotlib.pyplot as plt

    N, H, seg, rates = 32, 4, [8, 16, 32], [1, 2, 4]
    weights = reference.dilated_weights(N, H, seg, rates, is_causal=False)  # (H, N, N) key multiplicities
    top = max(int(weights.max()), 1)
    fig, axes = plt.subplots(1, H, figsize=(14, 3.4), layout="constrained")
    image = None
    for j, ax in enumerate(axes):
        image = ax.imshow(weights[j].numpy(), cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(f"head {j} (offset j mod r)")
        ax.set_xlabel("key")
        if j == 0:
            ax.set_ylabel("query")
    bar = fig.colorbar(image, ax=list(axes), ticks=range(top + 1), shrink=0.9)
    bar.set_label("times the key counts in\nthe query's softmax")
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
