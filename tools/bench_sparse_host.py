"""Host cost of a block-sparse training step: eager vs torch.compile vs torch.compile with CUDA graphs.

A step is BlockSparseAttention forward + backward (torch.autograd.grad), bf16, B=1, H=16, D=128,
BigBird at density ~0.1, for each N. Per mode:
  - GPU ms: median step time (triton.testing.do_bench; the host may be the bottleneck at small N);
  - host ms: Python/launch time per step while the GPU is kept busy (calls only queue work), which
    is what a model pays per layer whenever its GPU work is shorter;
  - equal: the mode's outputs and gradients equal eager's bit for bit (fresh inputs).
Modes: eager; torch.compile (Inductor, default); torch.compile(mode="reduce-overhead"), where the
block-sparse ops run between CUDA graphs (they are tagged cudagraph_unsafe: they keep launch tables
across calls); a manual torch.cuda.graph capture of the eager step (after a warm-up), whose replay
has no per-step host work. Beside them, the anchor a user would otherwise run: dense SDPA (cuDNN)
eager, forward + backward. Writes JSON + markdown + PNG to --out.

    source tools/srcpath.sh && python tools/bench_sparse_host.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import gpu_env, gpu_tag
from bench_sparse import bench_ms, make_layout

MODES = ("eager", "compile", "compile reduce-overhead", "cuda graph replay", "dense cuDNN eager")
HOST_CALLS = 20


def host_ms(fn: Callable[[], object], calls: int = HOST_CALLS) -> float:
    """Host time per call with the GPU busy (a long sleep kernel queued first), so no call waits on it."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))  # ~0.5 s of GPU work, longer than the calls take to queue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def measure_n(n: int, density: float, heads: int, head_dim: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attn_sparse import BlockSparseAttention

    dev = "cuda"
    layout = make_layout("bigbird", n, density, (128, 128), device=dev)
    module = BlockSparseAttention(layout, backend="triton")

    def inputs(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device=dev).manual_seed(seed)
        q, k, v, do = (
            torch.randn(1, n, heads, head_dim, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4)
        )
        return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = module(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    def dense_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
        return (out, *torch.autograd.grad(out, (q, k, v), do.transpose(1, 2)))

    x = inputs(0)
    rows = []
    for mode in MODES:
        torch._dynamo.reset()
        equal: bool | None = None
        if mode == "cuda graph replay":
            static = inputs(1)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step(*static)
            with torch.no_grad():
                for dst, src in zip(static, x):
                    dst.copy_(src)
            graph.replay()
            equal = all(torch.equal(a, b) for a, b in zip(captured, step(*x)))
            fn: Callable[[], object] = graph.replay
        elif mode == "dense cuDNN eager":
            fn = lambda: dense_step(*x)  # noqa: E731
        else:
            run = step if mode == "eager" else torch.compile(step, mode="reduce-overhead" if "reduce" in mode else None)
            if mode != "eager":
                equal = True
                for seed in (2, 3, 4):  # compile, record, replay: each on fresh inputs against eager
                    y = inputs(seed)
                    got = [t.clone() for t in run(*y)]
                    equal = equal and all(torch.equal(a, b) for a, b in zip(got, step(*y)))
            fn = lambda run=run: run(*x)  # noqa: E731
        gpu = statistics.median(bench_ms(fn, 20, 100) for _ in range(3))
        host = statistics.median(host_ms(fn) for _ in range(3))
        rows.append(dict(n=n, density=layout.density, mode=mode, gpu_ms=gpu, host_ms=host, equal=equal))
    return rows


def write_report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    env, rows = result["env"], result["rows"]
    name = f"sparse_host_{gpu_tag(env['gpu'])}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Block-sparse step host cost ({env['gpu']})",
        "",
        f"torch {env['torch']}; triton {env['triton']}; source {env['git_commit']}; bf16 B=1 H={env['heads']} "
        f"D={env['head_dim']}; BigBird, 128x128 blocks. Step = forward + backward. GPU ms: median step time; "
        "host ms: Python/launch time per step with the GPU kept busy; equal: outputs and gradients equal "
        "to eager's bit for bit. Written by tools/bench_sparse_host.py.",
        "",
        "| N | density | mode | GPU ms | host ms | host / eager host | equal to eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eager = next(e for e in rows if e["n"] == r["n"] and e["mode"] == "eager")
        lines.append(
            f"| {r['n']} | {r['density']:.3f} | {r['mode']} | {r['gpu_ms']:.3f} | {r['host_ms']:.3f} | "
            f"{r['host_ms'] / eager['host_ms']:.2f} | {'' if r['equal'] is None else r['equal']} |"
        )
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = sorted({r["n"] for r in rows})
    width = 0.8 / len(MODES)
    for ax, key, title in ((axes[0], "gpu_ms", "step time (ms)"), (axes[1], "host_ms", "host time per step (ms)")):
        for i, mode in enumerate(MODES):
            vals = [next(r[key] for r in rows if r["n"] == n and r["mode"] == mode) for n in ns]
            ax.bar([j + i * width for j in range(len(ns))], vals, width, label=mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ns))], [f"{n // 1024}K" for n in ns])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"block-sparse fwd+bwd step, {env['gpu']}, bf16 H={env['heads']} D={env['head_dim']}")
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--render", type=Path, help="re-render the report (md, PNG) into --out from a saved JSON")
    args = ap.parse_args()
    if args.render:
        write_report(json.loads(args.render.read_text()), args.out)
        return 0
    if not torch.cuda.is_available():
        print("bench_sparse_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from tqdm import tqdm

    env = gpu_env(heads=args.heads, head_dim=args.head_dim)
    rows: list[dict] = []
    for n in tqdm(args.seq_lens, desc="host-cost sweep", file=sys.stderr):
        rows += measure_n(n, args.density, args.heads, args.head_dim)
    write_report({"env": env, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
