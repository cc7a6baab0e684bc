"""Demo section: attn_sparse block layouts, the pattern library, and block-sparse attention.

1. Builds a PatternLibrary of several patterns, saves it to one safetensors file in the output
   folder, loads it back (validated) and checks it is equal.
2. Runs attn_sparse.block_sparse_attention (backend "auto") forward + backward on a few patterns
   (causal window, per-head BigBird with GQA, LongNet block form) and on token-exact masks with no
   layout (a causal sliding window over packed documents, GQA), and checks out, dq, dk, dv
   against attn_core.reference in float64 with the project's rule (error <= 2x plain PyTorch in
   the same dtype).
3. Notes how long building N = 1M-token patterns takes, and saves a PNG of a few layouts.
"""

from __future__ import annotations

import statistics
import time

import torch
from demo import DemoRow, grad_run, reference_rows, timed_grad_run

from attn_core import reference
from attn_sparse import (
    PatternLibrary,
    bigbird,
    block_sparse_attention,
    causal,
    explain,
    global_local,
    hierarchical,
    last_backend,
    local_window,
    longnet,
)


def _library_round_trip(ctx) -> DemoRow:
    t0 = time.perf_counter()
    lib = PatternLibrary()
    lib.add_pattern("window", "local_window", seq_len=4096, window=256, block_size=64)
    lib.add_pattern("longformer", "global_local", seq_len=4096, window=256, global_tokens=64, block_size=64)
    lib.add_pattern(
        "bigbird",
        "bigbird",
        seq_len=4096,
        window=128,
        global_tokens=64,
        random_blocks=3,
        seed=0,
        num_heads=4,
        block_size=64,
    )
    lib.add_pattern(
        "hierarchical", "hierarchical", seq_len=4096, windows=[256, 1024, 4096], strides=[1, 4, 16], block_size=64
    )
    lib.add_pattern(
        "longnet",
        "longnet",
        seq_len=4096,
        segment_lengths=[256, 1024],
        dilation_rates=[1, 4],
        num_heads=8,
        block_size=64,
    )
    lib.add(
        "causal_window", local_window(4096, 256, block_size=64) & causal(4096, block_size=64), params={"window": 256}
    )
    path = ctx.out_dir / "sparse_patterns.safetensors"
    lib.save(path)
    back = PatternLibrary.load(path)
    ms = (time.perf_counter() - t0) * 1e3
    same = back == lib
    return DemoRow(
        kind=f"sparse library round trip ({len(lib)} layouts)",
        backend="safetensors",
        why="one file, format version in metadata, validated on load",
        max_error=0.0 if same else None,
        tolerance=0.0,
        time_ms=ms,
        ok=same,
        note=f"{path.name}: {path.stat().st_size} bytes; "
        + ", ".join(f"{n} d={back[n].density:.3f}" for n in back.names()),
    )


# name, (B, N, H, Hkv, D), layout builder, is_causal
CASES = [
    (
        "causal window N=300",
        (2, 300, 4, 4, 32),
        lambda n: local_window(n, 64, block_size=64) & causal(n, block_size=64),
        True,
    ),
    (
        "bigbird per-head GQA N=448",
        (1, 448, 4, 2, 32),
        lambda n: bigbird(n, 64, 64, 2, seed=1, num_heads=4, block_size=64),
        False,
    ),
    ("longformer causal N=512", (1, 512, 2, 1, 64), lambda n: global_local(n, 64, 64, block_size=64), True),
    (
        "longnet block form N=512",
        (1, 512, 4, 4, 32),
        lambda n: longnet(n, [128, 256], [1, 2], num_heads=4, block_size=64),
        False,
    ),
]


def _attention_rows(name, dtype, device) -> list[DemoRow]:
    _, (B, N, H, Hkv, D), build, is_causal = next(c for c in CASES if c[0] == name)
    layout = build(N)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(device, dtype)
    dout = torch.randn(B, N, H, D, generator=g).to(device, dtype)
    choice = explain(q, k, v, layout, is_causal=is_causal)
    run = lambda a, b, c: block_sparse_attention(a, b, c, layout, is_causal=is_causal)  # noqa: E731
    got, ms = timed_grad_run(run, q, k, v, dout)
    ran = last_backend() or "?"
    mask, bs = layout.to_dense(), layout.block_size
    ref = grad_run(
        lambda a, b, c: reference.block_sparse_attention(a, b, c, mask, bs, is_causal=is_causal)[0], q, k, v, dout
    )
    base = grad_run(
        lambda a, b, c: reference.block_sparse_attention(a, b, c, mask, bs, is_causal=is_causal, dtype=dtype)[0].to(
            dtype
        ),
        q,
        k,
        v,
        dout,
    )
    rows = reference_rows(
        f"sparse {{label}} {name} {str(dtype).removeprefix('torch.')}",
        got,
        ref,
        base,
        choice=choice,
        ran=ran,
        time_ms=ms,
        note=f"density {layout.density:.3f}; ms = fwd+bwd",
    )
    return rows


# Token masks with no layout (tiles derived from them): causal sliding window of 48 keys over
# packed documents (a 1-token one, one longer than a tile), GQA.
TOKEN_MASKS = dict(
    is_causal=True,
    window_size=(47, 0),
    cu_seqlens=torch.tensor([0, 1, 150, 151, 290, 300], dtype=torch.int32),
)


def _token_mask_rows(dtype, device) -> list[DemoRow]:
    B, N, H, Hkv, D = 1, 300, 4, 2, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, N, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(device, dtype)
    dout = torch.randn(B, N, H, D, generator=g).to(device, dtype)
    masks = {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in TOKEN_MASKS.items()}
    choice = explain(q, k, v, None, **masks)
    got, ms = timed_grad_run(lambda a, b, c: block_sparse_attention(a, b, c, None, **masks), q, k, v, dout)
    ran = last_backend() or "?"
    ref = grad_run(lambda a, b, c: reference.dense_attention(a, b, c, **masks)[0], q, k, v, dout)
    base = grad_run(
        lambda a, b, c: reference.dense_attention(a, b, c, dtype=dtype, **masks)[0].to(dtype), q, k, v, dout
    )
    return reference_rows(
        f"sparse {{label}} token masks: causal window 48, 5 packed docs, GQA, N=300 {str(dtype).removeprefix('torch.')}",
        got,
        ref,
        base,
        choice=choice,
        ran=ran,
        time_ms=ms,
        note="layout=None: tiles derived from the masks; ms = fwd+bwd",
    )


def _build_times(ctx) -> None:
    n = 1 << 20
    builders = {
        "local_window": lambda: local_window(n, 1024, block_size=128),
        "global_local": lambda: global_local(n, 1024, 512, block_size=128),
        "bigbird": lambda: bigbird(n, 1024, 512, 3, block_size=128),
    }
    parts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small vectorised ops: one thread is fastest and steady on a busy machine
    try:
        for name, fn in builders.items():
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                lay = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            parts.append(f"{name} {statistics.median(times):.2f} ms ({lay.nnz} tiles)")
    finally:
        torch.set_num_threads(threads)
    ctx.notes.append(
        "attn_sparse pattern build at N=1M tokens, block 128, 1 CPU thread, median of 5: " + "; ".join(parts)
    )


def _plot(ctx) -> None:
    import matplotlib.pyplot as plt

    n = 8192
    layouts = {
        "local_window(...).tril()": local_window(n, 512, block_size=128).tril(),
        "bigbird (seed 0)": bigbird(n, 256, 256, 2, seed=0, block_size=128),
        "hierarchical": hierarchical(n, [512, 2048, n], [1, 4, 16], block_size=128),
        "longnet [1024,2048,4096]/[1,2,4]": longnet(n, [1024, 2048, 4096], [1, 2, 4], num_heads=8, block_size=128),
    }
    fig, axes = plt.subplots(1, len(layouts), figsize=(4 * len(layouts), 4))
    for ax, (title, lay) in zip(axes, layouts.items()):
        ax.imshow(lay.to_dense()[0].numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"{title}\ndensity {lay.density:.3f}", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(f"attn_sparse block layouts, N={n}, 128x128 blocks")
    ctx.save_plot(fig, "sparse_layouts")
    plt.close(fig)


def run(ctx) -> list[DemoRow]:
    device = torch.device(ctx.device)
    rows = [_library_round_trip(ctx)]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        for name, *_ in CASES:
            rows.extend(_attention_rows(name, dtype, device))
        rows.extend(_token_mask_rows(dtype, device))
    _build_times(ctx)
    _plot(ctx)
    return rows
