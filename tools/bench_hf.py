"""Hugging Face training-step benchmark: dilated_attention_pytorch.hf kinds vs transformers' own attention.

One GPU, bf16, a Llama-shaped causal LM built from a config (random weights, nothing downloaded;
defaults: hidden 2048, 16 heads, 4 KV heads, 4 layers, MLP 5632, vocab 8192), batch 1. A training
step is forward, loss, backward and an AdamW step; the median of --steps timed steps after
--warmup untimed ones (compilation, autotuning, caches) is reported, with tokens/s and the peak
GPU memory of the whole step (weights, gradients, optimizer state and activations). Two
comparisons, each anchor run in the same process right before the code under test:

- "window" at each --seq-lens (32K, 128K): a sliding window of --window (4096) tokens.
  Anchor: attn_implementation="flex_attention" on a model whose config has sliding_window (Mistral's
  config class: Llama's architecture plus sliding_window, so transformers builds the window mask).
  Ours: hf.register("block_sparse") with no layout options on the same config: it follows the
  model's mask token-exactly (query i sees keys i - W < j <= i, window_size=(W - 1, 0)), the same
  math as the anchor, with the tiles derived from the window (attn_sparse's derived block size).
  Target: ours' step >= 1.2x faster.
- "dense" at --dense-seq-lens (128K): the Llama config without a window. Anchor:
  attn_implementation="sdpa" (dense causal); ours: hf.register("longnet", --segments, --rates).
  Reported: the tokens/s ratio and both peak memories (different math: LongNet is sparse).

The vocabulary defaults to 8192 because transformers' loss upcasts the (N x vocab) logits to
float32: at 128K a 32000-token vocabulary alone would take ~40 GB and hide the attention's share.
Writes hf_<gpu>.json, .md and .png to --out (partial JSON after every point). --smoke runs a tiny
model on the CPU in seconds to check the script end to end (timings meaningless there).

    source tools/srcpath.sh && HF_HUB_OFFLINE=1 python tools/bench_hf.py --out docs/benchmarks
    HF_HUB_OFFLINE=1 python tools/bench_hf.py --smoke --out /tmp/bench-hf
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import gpu_env, gpu_tag, source_revision

TARGET_WINDOW_SPEEDUP = 1.2


@dataclass(frozen=True)
class Case:
    """One measured point. comparison: "window" or "dense"; role: "anchor" (transformers' own
    attention) or "ours" (a dilated_attention_pytorch.hf kind); attention: the label in the report."""

    comparison: str
    n: int
    role: str
    attention: str


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for n in args.seq_lens:
        out += [Case("window", n, "anchor", "flex_attention"), Case("window", n, "ours", "block_sparse")]
    for n in args.dense_seq_lens:
        out += [Case("dense", n, "anchor", "sdpa"), Case("dense", n, "ours", "longnet")]
    return out


def model_and_config(args: argparse.Namespace, case: Case) -> tuple[Any, Any]:
    """(model class, config) for ``case``: Llama's shape; the window comparison adds sliding_window."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=case.n,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    if case.comparison == "window":
        return MistralForCausalLM, MistralConfig(**shape, sliding_window=args.window)
    return LlamaForCausalLM, LlamaConfig(**shape)


def attn_implementation(args: argparse.Namespace, case: Case) -> str:
    """The name to pass as attn_implementation (registering ours with dilated_attention_pytorch.hf)."""
    if case.role == "anchor":
        return case.attention
    from dilated_attention_pytorch import hf

    if case.attention == "block_sparse":
        return hf.register("block_sparse")  # no layout options: the config's token-exact window
    return hf.register("longnet", segment_lengths=args.segments, dilation_rates=args.rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_flex_attention(device: torch.device, dtype: torch.dtype) -> None:
    """Raise what torch's FlexAttention raises for forward + backward on ``device`` (e.g. no backward on
    the CPU), on tiny tensors in eager mode: seconds, where transformers' compiled path would first
    spend minutes compiling."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 128, 16, device=device, dtype=dtype, requires_grad=True)
    flex_attention(q, q, q).sum().backward()


def measure(args: argparse.Namespace, case: Case, device: torch.device, dtype: torch.dtype) -> dict:
    """Train ``case`` for warmup + timed steps; the row with its status ("ok", "not supported yet: ...",
    "not available on this device: ...", "out of memory: ...", or "failed: ...")."""
    row: dict[str, Any] = {"comparison": case.comparison, "n": case.n, "role": case.role, "attention": case.attention}
    model = opt = None
    try:
        if case.attention == "flex_attention":
            check_flex_attention(device, dtype)
        name = attn_implementation(args, case)
        row["attn_implementation"] = name
        model_cls, config = model_and_config(args, case)
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls(config).to(dtype)
        model.set_attn_implementation(name)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, args.vocab, (args.batch, case.n), generator=gen).to(device)
        losses: list[float] = []

        def step() -> None:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        if not all(math.isfinite(x) for x in losses):
            row["status"] = f"failed: non-finite loss {losses}"
            return row
        step_ms = statistics.median(times)
        row.update(
            status="ok",
            step_ms=step_ms,
            step_ms_all=times,
            tokens_per_s=args.batch * case.n / (step_ms / 1e3),
            peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            loss_first=losses[0],
            loss_last=losses[-1],
        )
        if case.attention == "longnet":
            from attn_core import last_backend

            row["backend"] = last_backend()
        elif case.attention == "block_sparse":
            from attn_sparse import last_backend as sparse_backend

            row["backend"] = sparse_backend()
    except torch.OutOfMemoryError as exc:
        row["status"] = f"out of memory: {str(exc).splitlines()[0]}"
    except ValueError as exc:
        if case.role != "ours":
            raise
        # the integration refuses what its kernels cannot compute exactly: a result, not a crash
        row["status"] = f"not supported yet: {exc}"
    except Exception as exc:
        if case.role == "anchor" and device.type != "cuda":
            row["status"] = f"not available on this device ({device.type}): {type(exc).__name__}: {exc}"
        else:
            row["status"] = f"failed: {type(exc).__name__}: {exc}"
    finally:
        model = opt = None  # free the GPU memory before the next point
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def comparisons(rows: list[dict]) -> list[dict]:
    """Ours vs the anchor per (comparison, N): speedup of the step (window) or tokens/s and memory ratios (dense)."""
    out = []
    for comp, n in dict.fromkeys((r["comparison"], r["n"]) for r in rows):
        anchor = next((r for r in rows if (r["comparison"], r["n"], r["role"]) == (comp, n, "anchor")), None)
        ours = next((r for r in rows if (r["comparison"], r["n"], r["role"]) == (comp, n, "ours")), None)
        if anchor is None or ours is None:
            continue
        item: dict[str, Any] = {"comparison": comp, "n": n, "ours": ours["attention"], "anchor": anchor["attention"]}
        both = anchor["status"] == "ok" and ours["status"] == "ok"
        if not both:
            bad = ours if ours["status"] != "ok" else anchor
            item["status"] = f"{bad['attention']}: {bad['status'].split(':')[0]} (see above)"
        else:
            item["status"] = "ok"
            item["tokens_per_s_ratio"] = ours["tokens_per_s"] / anchor["tokens_per_s"]
            if comp == "window":
                item["step_speedup"] = anchor["step_ms"] / ours["step_ms"]
                item["target"] = TARGET_WINDOW_SPEEDUP
                item["target_met"] = item["step_speedup"] >= TARGET_WINDOW_SPEEDUP
            if ours["peak_mem_gib"] is not None and anchor["peak_mem_gib"] is not None:
                item["peak_mem_ratio"] = ours["peak_mem_gib"] / anchor["peak_mem_gib"]
        out.append(item)
    return out


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    import transformers

    from attn_sparse.api import DERIVED_BLOCK_SIZE

    settings = dict(
        dtype=args.dtype,
        batch=args.batch,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        layers=args.layers,
        vocab=args.vocab,
        window=args.window,
        derived_block_size=list(DERIVED_BLOCK_SIZE),
        segments=args.segments,
        rates=args.rates,
        warmup=args.warmup,
        steps=args.steps,
        smoke=args.smoke,
    )
    if device.type == "cuda":
        env = gpu_env(**settings)
    else:
        try:
            import triton

            triton_version: str | None = triton.__version__
        except ImportError:
            triton_version = None
        env = dict(
            gpu=None,
            cpu=platform.processor() or platform.machine(),
            torch=torch.__version__,
            triton=triton_version,
            python=platform.python_version(),
            **settings,
            git_commit=source_revision(),
        )
    env["transformers"] = transformers.__version__
    return env


def report_name(env: dict) -> str:
    return f"hf_{gpu_tag(env['gpu']) if env.get('gpu') else 'cpu'}{'_smoke' if env.get('smoke') else ''}"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _n(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def write_report(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    env, rows, summary = result["env"], result["rows"], result["comparisons"]
    name = report_name(env)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    where = env["gpu"] or f"CPU ({env['cpu']})"
    lines = [
        "# Hugging Face training step: dilated_attention_pytorch.hf vs transformers' attention",
        "",
        f"{where}; torch {env['torch']}; triton {env['triton']}; transformers {env['transformers']}; "
        f"source {env['git_commit']}. {env['dtype']}, batch {env['batch']}, Llama shape: hidden {env['hidden']}, "
        f"{env['heads']} heads, {env['kv_heads']} KV heads, {env['layers']} layers, MLP {env['intermediate']}, "
        f"vocab {env['vocab']}; random weights. Step = forward + loss + backward + AdamW; median of {env['steps']} "
        f"timed steps after {env['warmup']} warm-up steps; peak = max GPU memory allocated over the steps.",
        "",
        f"window: sliding window {env['window']} tokens (config sliding_window, token-exact in both), block_sparse "
        f"with tiles derived from the window (blocks {env['derived_block_size']}) vs flex_attention. dense: longnet "
        f"segments {env['segments']}, rates {env['rates']} vs sdpa (dense causal; different math, LongNet is sparse).",
        "",
        "| comparison | N | attention | status | step ms | tokens/s | peak GiB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r["status"] == "ok" else "-"
        label = r["attention"] + (f" ({r['backend']})" if r.get("backend") else "")
        lines.append(
            f"| {r['comparison']} | {_n(r['n'])} | {label} | {r['status']} | {_num(r.get('step_ms'), '.1f')} | "
            f"{_num(r.get('tokens_per_s'), '.0f')} | {_num(r.get('peak_mem_gib'), '.2f')} | {loss} |"
        )
    lines += [
        "",
        "## Ours vs the anchor",
        "",
        f"| comparison | N | ours / anchor | status | step speedup (target {TARGET_WINDOW_SPEEDUP}) | "
        "tokens/s ratio | peak memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary:
        speedup = "-"
        if "step_speedup" in c:
            speedup = f"{c['step_speedup']:.2f} ({'met' if c['target_met'] else 'not met'})"
        lines.append(
            f"| {c['comparison']} | {_n(c['n'])} | {c['ours']} / {c['anchor']} | {c['status']} | {speedup} | "
            f"{_num(c.get('tokens_per_s_ratio'), '.2f')} | {_num(c.get('peak_mem_ratio'), '.2f')} |"
        )
    if env.get("smoke"):
        lines += ["", "Smoke run (tiny model): checks the script end to end; the timings mean nothing."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['comparison']} {_n(r['n'])}\n{r['attention']}" for r in rows]
    x = list(range(len(rows)))
    for ax, key, ylabel in (
        (axes[0], "tokens_per_s", "tokens/s (training step)"),
        (axes[1], "peak_mem_gib", "peak GiB"),
    ):
        values = [r.get(key) or 0.0 for r in rows]
        colors = ["tab:blue" if r["role"] == "ours" else "tab:gray" for r in rows]
        ax.bar(x, values, color=colors)
        top = max(values) if any(values) else 1.0
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                ax.text(i, 0.02 * top, r["status"].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=8)
            elif r.get(key) is None:
                ax.text(i, 0.02 * top, "not measured on CPU", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.1 * top)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_title("blue: dilated_attention_pytorch.hf, gray: transformers' own")
    axes[1].set_title("peak memory of the step")
    fig.suptitle(f"HF Llama-shaped training step, {where}, {env['dtype']}", y=1.02)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / f"{name}.md"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if values and min(values) <= 0:  # empty ("") skips that comparison
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


SMOKE = dict(
    hidden=64,
    intermediate=128,
    heads=4,
    kv_heads=2,
    layers=2,
    vocab=256,
    seq_lens=[512],
    dense_seq_lens=[512],
    window=128,
    segments=[128, 256, 512],
    rates=[1, 2, 4],
    warmup=1,
    steps=2,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-output"))
    ap.add_argument("--seq-lens", type=_ints, default=[32768, 131072], help="window comparison lengths")
    ap.add_argument("--dense-seq-lens", type=_ints, default=[131072], help="longnet vs sdpa lengths")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--segments", type=_ints, default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--rates", type=_ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script in seconds")
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_hf.py needs a CUDA GPU (or --smoke for the CPU check)", file=sys.stderr)
        return 2
    if len(args.segments) != len(args.rates):
        ap.error(f"--segments {args.segments} and --rates {args.rates} must have the same length")
    if min(args.warmup + 1, args.steps, args.batch, args.window) <= 0:
        ap.error("--warmup must be >= 0; --steps, --batch and --window >= 1")
    dtype = getattr(torch, args.dtype)
    from tqdm import tqdm

    env = environment(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{report_name(env)}.partial.json"
    rows: list[dict] = []
    todo = cases(args)
    bar = tqdm(todo, desc="hf training steps", file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(f"{case.comparison} {_n(case.n)} {case.attention}")
        rows.append(measure(args, case, device, dtype))
        partial.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    bar.close()
    result = {"env": env, "rows": rows, "comparisons": comparisons(rows)}
    report = write_report(result, args.out)
    partial.unlink()
    print(report.read_text())
    print(f"report: {report}", file=sys.stderr)
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
