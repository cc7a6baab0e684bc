"""Benchmark: packed variable-length documents (cu_seqlens) on the sdpa backend.

A packed batch of --tokens tokens (default 256K) of documents whose lengths are drawn from a
fixed-seed log-normal (mean --mean 8K, sigma --sigma, clipped to [--min-len 256, --max-len 128K];
the last document is cut to fill the batch exactly). LongNet config segments [2048, 4096, 8192,
16384], rates [1, 2, 4, 8], D=128, bf16, heads H/Hkv = 16/16 and 32/8, both head modes, causal and
not. Per point, forward+backward (median of --reps after a warm-up; CUDA events) of:

* packed:   dilated_attention(..., cu_seqlens=cu, backend="sdpa") over the whole batch; also with
            attn_core.packed_views.PACKED_STREAMS = 1 (everything in order on one CUDA stream);
* unpacked: the same tensors as one sequence of the same length, no cu_seqlens (the bar: packed
            <= 1.1x unpacked);
* loop:     a Python loop calling dilated_attention on each document, outputs concatenated, one
            backward (the bar: packed >= 5x faster).

Effective TFLOP/s = 4 * D * attended (query, key) pairs (x3.5 for fwd+bwd), pairs counted per
document as computed. The packed plan (strided pieces / strided-kernel tables or gathered varlen calls per group) and the
varlen implementation are recorded. First a correctness check: packed bf16 outputs and gradients
against the float64 reference run per document (the 2x rule of attn_core.testing), on a
scaled-down packing with GQA and key padding.

    source tools/srcpath.sh && python tools/bench_varlen.py [--quick] [--out docs/benchmarks]
    python tools/bench_varlen.py --op ring_dilated   # the same table for the ring's per-rank work
    python tools/bench_varlen.py --op ring           # ring_attention (dense): packed vs the loop

--op ring_dilated / ring: ring_dilated_attention / ring_attention on a one-rank process group
(NCCL on the GPU; gloo for --quick on the CPU): the per-rank work of the ring with the whole
batch on one rank. Dense ring attention has no head mode and no unpacked bar (one unpacked
sequence computes far more pairs than the documents).

--quick: a small packing (8K tokens, segments [128..1024], D=32, 1 rep) that also runs on the CPU
(float32) as a smoke test of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cuda_median_ms, gpu_env, gpu_tag

GIB = 1024**3


def parse_tokens(text: str) -> int:
    tok = text.strip().upper()
    mult = 1024 * 1024 if tok.endswith("M") else 1024 if tok.endswith("K") else 1
    return int(tok.rstrip("KM")) * mult


def document_lengths(total: int, mean: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    """Log-normal lengths (mean ``mean`` before clipping to [low, high]), drawn until they fill
    ``total`` tokens; the last one is cut to fit."""
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[exp(N(mu, sigma^2))] = mean
    lengths: list[int] = []
    while sum(lengths) < total:
        draw = torch.exp(mu + sigma * torch.randn(256, generator=g, dtype=torch.float64))
        lengths += [int(x) for x in draw.clamp(low, high).round().tolist()]
    out, used = [], 0
    for n in lengths:
        take = min(n, total - used)
        out.append(take)
        used += take
        if used == total:
            break
    return out


def default_lengths() -> list[int]:
    """The benchmark's packed batch with the default options: 256K tokens, log-normal mean 8K,
    sigma 1, clipped to [256, 128K], seed 0 (41 documents); the probes time the same batch."""
    return document_lengths(262144, 8192.0, 1.0, 256, 131072, 0)


def offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def attended_pairs(
    lengths: list[int], h: int, segments: list[int], rates: list[int], mode: str, causal: bool, op: str = "dilated"
) -> int:
    """(query, key) pairs the packed call computes: every document's segments, per group and head
    (``op`` "ring": every document as one dense attention)."""
    if op == "ring":
        return h * sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    from attn_core.config import DilatedConfig
    from attn_core.packing import document_segments

    cfg = DilatedConfig(segments, rates, mode)
    cu = offsets(lengths, torch.device("cpu"))
    total = 0
    for g in range(cfg.num_groups):
        w, r = cfg.group_extent(g, sum(lengths))
        _, _, seg_len = document_segments(cu, w)
        for o, heads in cfg.heads_by_offset(g, h, sum(lengths)):
            rows = torch.clamp(-(-(seg_len - o) // r), min=0)
            per = rows * (rows + 1) // 2 if causal else rows * rows
            total += len(heads) * int(per.sum())
    return total


def time_ms(fn: Any, reps: int, dev: torch.device) -> float:
    """Median ms of fn() over reps runs after one warm-up (CUDA events on a GPU, wall clock on the CPU)."""
    if dev.type == "cuda":
        return cuda_median_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn: Any, dev: torch.device) -> float | None:
    """GiB allocated at peak during fn() beyond what was allocated before (GPU only)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return (peak - before) / GIB


def fwd_bwd(fn: Any, leaves: list[torch.Tensor], go: torch.Tensor) -> Any:
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, go))


OPS = ("dilated", "ring_dilated", "ring")
# attn_core.packed_views settings a timed form runs under (forward and backward): the packed call
# with every piece and table in order on one CUDA stream, beside the default
FORM_SETTINGS: dict[str, dict[str, int]] = {"packed_one_stream": {"PACKED_STREAMS": 1}}


@contextlib.contextmanager
def packed_settings(settings: dict[str, int]) -> Iterator[None]:
    """attn_core.packed_views' module settings overridden inside the block, restored after."""
    from attn_core import packed_views

    saved = {name: getattr(packed_views, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(packed_views, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(packed_views, name, value)


def op_call(cfg: dict[str, Any], mode: str, causal: bool, op: str) -> Callable[..., torch.Tensor]:
    """attend(q, k, v, **extra) -> out: dilated_attention (sdpa backend), ring_dilated_attention or
    ring_attention (dense; head mode unused) over the default process group (one rank here: the
    per-rank work of the ring); ``extra``: cu_seqlens, key_padding_mask (not for ring_attention)."""
    seg, rates = cfg["segments"], cfg["rates"]
    if op == "dilated":
        from attn_core.api import dilated_attention

        return lambda q, k, v, **extra: dilated_attention(
            q, k, v, seg, rates, is_causal=causal, head_mode=mode, backend="sdpa", **extra
        )
    if op == "ring_dilated":
        from attn_ring import ring_dilated_attention

        return lambda q, k, v, **extra: ring_dilated_attention(
            q, k, v, seg, rates, is_causal=causal, head_mode=mode, **extra
        )
    if op == "ring":
        from attn_ring import ring_attention

        return lambda q, k, v, **extra: ring_attention(q, k, v, is_causal=causal, **extra)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def runners(
    cfg: dict[str, Any], cu: torch.Tensor, bounds: list[tuple[int, int]], mode: str, causal: bool, op: str = "dilated"
) -> dict:
    """The forms timed at one point: fn(q, k, v) -> out, of :func:`op_call`'s ``op`` (packed, unpacked
    and loop; no unpacked for dense ring attention)."""
    attend = op_call(cfg, mode, causal, op)

    def packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v, cu_seqlens=cu)

    def unpacked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v)

    def loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = [attend(q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in bounds if e > s]
        return torch.cat(parts, dim=1)

    if op == "ring":  # dense over the whole sequence computes far more pairs than the documents': no bar
        return {"packed": packed, "loop": loop}
    if op == "dilated":
        return {"packed": packed, "packed_one_stream": packed, "unpacked": unpacked, "loop": loop}
    return {"packed": packed, "unpacked": unpacked, "loop": loop}


def plan_summary(
    cu: torch.Tensor, n: int, h: int, hkv: int, d: int, cfg: dict[str, Any], mode: str, dev: torch.device
) -> list:
    """Per group: the forward's and the backward's strided pieces, and the rest (the backward's) as
    strided-kernel tables or gathered varlen calls (with their varlen implementation), as the sdpa
    backend plans them for this dtype and device."""
    from attn_core import packed_views
    from attn_core.config import DilatedConfig
    from attn_core.varlen import explain_varlen

    kernel = packed_views.uses_strided_kernel(torch.empty(1, 1, d, device=dev, dtype=cfg["dtype"]))
    config = DilatedConfig(cfg["segments"], cfg["rates"], mode)
    forward = packed_views.plan_packed(cu, (n, h, hkv, d), config, dev, kernel=kernel, backward=False)
    plan = packed_views.plan_packed(cu, (n, h, hkv, d), config, dev, kernel=kernel, backward=True)
    out = []
    for forward_group, group in zip(forward, plan, strict=True):
        impls = ["strided kernel"] if group.sequences else []
        for c in group.calls:
            rows = n if c.rows is None else c.rows.numel()
            # shapes only (explain reads no data): stride-0 stand-ins of the call's gathered tensors
            q = torch.empty(1, c.q_hn, d, device=dev, dtype=cfg["dtype"]).expand(rows, -1, -1)
            k = torch.empty(1, c.kv_hn, d, device=dev, dtype=cfg["dtype"]).expand(rows, -1, -1)
            impls.append(explain_varlen(q, k, k, c.cu_seqlens, c.cu_seqlens, c.max_seqlen, c.max_seqlen).backend)
        out.append(
            dict(
                forward_pieces=len(forward_group.pieces),
                strided_pieces=len(group.pieces),
                gathered_calls=len(group.calls) + len(group.sequences),
                varlen=sorted(set(impls)),
            )
        )
    return out


def plan_text(group: dict[str, Any]) -> str:
    """One group of :func:`plan_summary` as "forward pieces/backward pieces/other calls" (rows written
    before the passes' pieces differed have no forward count: "pieces/other calls")."""
    pieces = f"{group['forward_pieces']}/" if "forward_pieces" in group else ""
    return f"{pieces}{group['strided_pieces']}/{group['gathered_calls']}"


def bench_point(
    cfg: dict[str, Any],
    lengths: list[int],
    heads: tuple[int, int],
    mode: str,
    causal: bool,
    reps: int,
    dev: torch.device,
    op: str = "dilated",
) -> dict[str, Any]:
    h, hkv = heads
    d, n = cfg["D"], sum(lengths)
    cu = offsets(lengths, dev)
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))
    row: dict[str, Any] = dict(H=h, Hkv=hkv, mode=mode, causal=causal, N=n, docs=len(lengths))
    g = torch.Generator(device=dev).manual_seed(h * 7 + hkv + causal)
    q = torch.randn(1, n, h, d, device=dev, generator=g).to(cfg["dtype"])
    k, v = (torch.randn(1, n, hkv, d, device=dev, generator=g).to(cfg["dtype"]) for _ in range(2))
    go = torch.randn(1, n, h, d, device=dev, generator=g).to(cfg["dtype"])
    leaves = [t.requires_grad_() for t in (q, k, v)]
    # the ring's packed schedule is its own (attn_ring); the sdpa planner's plan is reported for dilated
    row["plan"] = plan_summary(cu, n, h, hkv, d, cfg, mode, dev) if op == "dilated" else []
    flops = 4.0 * d * attended_pairs(lengths, h, cfg["segments"], cfg["rates"], mode, causal, op)
    forms = runners(cfg, cu, bounds, mode, causal, op)
    for name, fn in forms.items():
        try:
            with packed_settings(FORM_SETTINGS.get(name, {})):
                ms = time_ms(lambda fn=fn: fwd_bwd(fn, leaves, go), reps, dev)
                row[f"{name}_ms"] = ms
                row[f"{name}_extra_gib"] = peak_extra_gib(lambda fn=fn: fwd_bwd(fn, leaves, go), dev)
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_error"] = "OOM"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "packed_ms" in row:
        row["packed_tflops"] = 3.5 * flops / row["packed_ms"] / 1e9
        if "unpacked_ms" in row:
            row["packed_vs_unpacked"] = row["packed_ms"] / row["unpacked_ms"]
        if "loop_ms" in row:
            row["loop_vs_packed"] = row["loop_ms"] / row["packed_ms"]
    return row


def correctness(cfg: dict[str, Any], dev: torch.device, op: str = "dilated") -> list[dict[str, Any]]:
    """The packed ``op`` (see :func:`runners`) vs the float64 reference per document (2x rule),
    scaled-down packing (ring_attention: no padding, one case per causal flag)."""
    from attn_core import reference
    from attn_core.testing import assert_close_to_reference, max_abs_error

    seg, rates = cfg["check_segments"], cfg["rates"]
    lengths = document_lengths(cfg["check_tokens"], seg[1], 1.0, 1, 2 * seg[-1], seed=1)
    lengths[1:1] = [0, 1, seg[0], seg[-1] + 3]  # empty, one token, exactly a segment, longer than the largest
    cu = offsets(lengths, dev)
    n, d, dtype = sum(lengths), cfg["check_D"], cfg["dtype"]
    rows = []
    cases = [(8, 2, "all", True, False), (8, 8, "split", False, True), (8, 4, "split", True, True)]
    if op == "ring":
        cases = [(8, 2, "-", True, False), (8, 8, "-", False, False)]
    for h, hkv, mode, causal, pad in cases:
        g = torch.Generator(device=dev).manual_seed(len(rows) + 3)
        q, k, v, go = (torch.randn(1, n, x, d, device=dev, generator=g).to(dtype) for x in (h, hkv, hkv, h))
        mask = (torch.rand(1, n, device=dev, generator=g) < 0.2) if pad else None
        leaves = [t.requires_grad_() for t in (q, k, v)]
        extra = {"cu_seqlens": cu} if mask is None else {"cu_seqlens": cu, "key_padding_mask": mask}
        out = op_call(dict(cfg, segments=seg), mode, causal, op)(*leaves, **extra)
        mine = (out, *torch.autograd.grad(out, leaves, go))
        res: dict[str, Any] = dict(H=h, Hkv=hkv, mode=mode, causal=causal, padding=pad, ok=True)
        refs = {}
        for cdt in (torch.float64, dtype):
            ls = [t.detach().to(cdt).requires_grad_() for t in (q, k, v)]
            parts = []
            for s, e in itertools.pairwise(cu.tolist()):
                m = None if mask is None else mask[:, s:e]
                doc = (ls[0][:, s:e], ls[1][:, s:e], ls[2][:, s:e])
                if op == "ring":
                    o, _ = reference.dense_attention(*doc, is_causal=causal, dtype=cdt)
                else:
                    o, _ = reference.dilated_attention(
                        *doc, seg, rates, is_causal=causal, head_mode=mode, key_padding_mask=m, dtype=cdt
                    )
                parts.append(o.to(cdt))
            o = torch.cat(parts, dim=1)
            refs[cdt] = (o, *torch.autograd.grad(o, ls, go.to(cdt)))
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            res[f"{name}_err"] = max_abs_error(mine[i], refs[torch.float64][i])
            res[f"{name}_plain_err"] = max_abs_error(refs[dtype][i], refs[torch.float64][i])
            try:
                assert_close_to_reference(name, mine[i], refs[torch.float64][i], refs[dtype][i])
            except AssertionError as exc:
                res["ok"] = False
                res.setdefault("fail", []).append(str(exc))
        rows.append(res)
    return rows


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(res: dict[str, Any]) -> str:
    env, cfg = res["env"], res["config"]
    op = cfg.get("op", "dilated")
    what = {
        "dilated": "dilated_attention (sdpa backend)",
        "ring_dilated": "ring_dilated_attention, one rank",
        "ring": "ring_attention (dense), one rank",
    }[op]
    one_stream = " packed, one stream ms |" if op == "dilated" else ""
    lines = [
        f"# Packed documents (cu_seqlens): {what}, {env.get('gpu', env.get('device'))}",
        "",
        f"torch {env['torch']}, python {env['python']}, {env['date']}. {cfg['tokens']} tokens in {cfg['docs']} "
        f"documents (log-normal mean {cfg['mean']}, sigma {cfg['sigma']}, clipped to [{cfg['min_len']}, "
        f"{cfg['max_len']}], seed {cfg['seed']}; lengths min {cfg['shortest']}, median {cfg['median']}, max "
        f"{cfg['longest']}). Segments {cfg['segments']}, rates {cfg['rates']}, D={cfg['D']}, {cfg['dtype']}.",
        "fwd+bwd ms (median of reps). packed = one call with cu_seqlens"
        + (
            " (one stream: a group's strided pieces and kernel tables in order on one CUDA stream, PACKED_STREAMS=1)"
            if op == "dilated"
            else ""
        )
        + "; unpacked = the same tensors as one "
        f"sequence; loop = one call per document in a Python loop ({what}). Eff. TF/s = 3.5 * 4 * D * pairs computed"
        + (
            " (dense: every document's full attention; one unpacked sequence is not timed, it computes far more pairs)."
            if op == "ring"
            else "."
        ),
        "",
        f"| H/Hkv | mode | causal | packed ms (TF/s) |{one_stream} unpacked ms | loop ms | packed / unpacked "
        "| loop / packed | extra GiB packed / unpacked | strided pieces fwd / bwd, other calls per group |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if one_stream else ""),
    ]
    for r in res["rows"]:
        plan = ", ".join(plan_text(p) for p in r["plan"]) or "-"
        lines.append(
            f"| {r['H']}/{r['Hkv']} | {r['mode']} | {'yes' if r['causal'] else 'no'} "
            f"| {_f(r.get('packed_ms'), '.2f')} ({_f(r.get('packed_tflops'), '.0f')}) "
            + (f"| {_f(r.get('packed_one_stream_ms'), '.2f')} " if one_stream else "")
            + f"| {_f(r.get('unpacked_ms'), '.2f')} | {_f(r.get('loop_ms'), '.2f')} "
            f"| {_f(r.get('packed_vs_unpacked'), '.2f')} | {_f(r.get('loop_vs_packed'), '.2f')} "
            f"| {_f(r.get('packed_extra_gib'), '.2f')} / {_f(r.get('unpacked_extra_gib'), '.2f')} | {plan} |"
        )
    impls = sorted({i for r in res["rows"] for p in r["plan"] for i in p["varlen"]})
    if op == "dilated":
        lines += ["", f"What ran the segments off the strided pieces: {', '.join(impls) or 'nothing'}."]
    if res.get("correctness"):
        ok = sum(c["ok"] for c in res["correctness"])
        lines.append(
            f"Correctness: {ok}/{len(res['correctness'])} packed cases pass the 2x rule (outputs and dq/dk/dv vs "
            "the float64 reference per document; GQA, causal" + (")." if op == "ring" else ", padding, both modes).")
        )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [f"{r['H']}/{r['Hkv']} {r['mode']}\n{'causal' if r['causal'] else 'full'}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.27
    for i, (name, color) in enumerate((("packed", "C0"), ("unpacked", "C1"), ("loop", "C2"))):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r.get(f"{name}_ms", 0.0) for r in rows], width, label=name, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("fwd+bwd ms")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    cfg = res["config"]
    ax.set_title(f"{cfg['tokens']} tokens, {cfg['docs']} documents, {res['env'].get('gpu', res['env'].get('device'))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def progress(items: list, desc: str) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:  # a plain count on stderr without tqdm
        return _Counter(items, desc)


class _Counter:
    def __init__(self, items: list, desc: str) -> None:
        self.items, self.desc = items, desc

    def __iter__(self) -> Any:
        for i, item in enumerate(self.items):
            print(f"{self.desc}: {i + 1}/{len(self.items)}", file=sys.stderr, flush=True)
            yield item


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256K")
    ap.add_argument("--mean", type=float, default=8192.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", default="128K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default="16/16,32/8", help="H/Hkv pairs")
    ap.add_argument("--modes", default="all,split")
    ap.add_argument("--causal", default="no,yes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8K tokens, small segments, D=32, 1 rep; runs on the CPU")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument(
        "--op",
        choices=OPS,
        default="dilated",
        help="what is timed: dilated_attention (sdpa), or ring_dilated_attention / ring_attention on a one-rank "
        "process group (the per-rank work of the ring)",
    )
    ap.add_argument(
        "--name", default=None, help="file name stem (default varlen[_<op>]_<gpu>, varlen[_<op>]_quick_cpu)"
    )
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.quick:
        print("bench_varlen.py needs a CUDA GPU (or --quick for a CPU smoke run); none is visible")
        return 1
    cfg: dict[str, Any] = dict(
        segments=[2048, 4096, 8192, 16384], rates=[1, 2, 4, 8], D=128, dtype=torch.bfloat16,
        check_segments=[256, 512, 1024, 2048], check_tokens=6000, check_D=64,
    )  # fmt: skip
    tokens, mean, low, high, reps = (
        parse_tokens(args.tokens),
        args.mean,
        args.min_len,
        parse_tokens(args.max_len),
        args.reps,
    )
    if args.quick:
        cfg.update(segments=[128, 256, 512, 1024], D=32, check_segments=[16, 32, 64, 128], check_tokens=600, check_D=16)
        tokens, mean, low, high, reps = 8 * 1024, 512.0, 16, 8 * 1024, 1
        if dev.type == "cpu":
            cfg["dtype"] = torch.float32
    lengths = document_lengths(tokens, mean, args.sigma, low, high, args.seed)
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads.split(",")]
    modes = args.modes.split(",") if args.op != "ring" else ["-"]  # dense ring attention has no head mode
    causals = [{"no": False, "yes": True}[c] for c in args.causal.split(",")]

    if dev.type == "cuda":
        env = gpu_env(cudnn=torch.backends.cudnn.version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    else:
        env = dict(
            device=platform.processor() or platform.machine(), torch=torch.__version__,
            python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )  # fmt: skip
    print(env)
    sorted_lengths = sorted(lengths)
    config = dict(
        tokens=tokens, docs=len(lengths), mean=mean, sigma=args.sigma, min_len=low, max_len=high, seed=args.seed,
        shortest=sorted_lengths[0], median=sorted_lengths[len(lengths) // 2], longest=sorted_lengths[-1],
        segments=cfg["segments"], rates=cfg["rates"], D=cfg["D"], dtype=str(cfg["dtype"]).replace("torch.", ""),
        reps=reps, lengths=lengths,
    )  # fmt: skip
    if args.op != "dilated":
        from bench_ring_dilated import init_group

        init_group()  # a one-rank group (NCCL on the GPU, gloo on the CPU)
    result: dict[str, Any] = dict(env=env, config=dict(config, op=args.op))
    stem = "varlen" if args.op == "dilated" else f"varlen_{args.op}"
    name = args.name or (f"{stem}_{gpu_tag(env['gpu'])}" if dev.type == "cuda" else f"{stem}_quick_cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"

    if not args.no_check:
        checks = correctness(cfg, dev, args.op)
        result["correctness"] = checks
        bad = [c for c in checks if not c["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} pass (packed vs float64 per document, 2x rule)")
        for c in bad:
            print("  FAIL", c)

    rows: list[dict[str, Any]] = []
    jobs = [(hp, mode, causal) for hp in heads for mode in modes for causal in causals]
    for hp, mode, causal in progress(jobs, "varlen sweep"):
        rows.append(bench_point(cfg, lengths, hp, mode, causal, reps, dev, args.op))
        result["rows"] = rows  # saved after every point: a late failure keeps what was measured
        json_path.write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    (args.out / f"{name}.md").write_text(md)
    plot(result, args.out / f"{name}.png")
    print(md)
    bad_checks = [c for c in result.get("correctness", []) if not c["ok"]]
    return 1 if bad_checks else 0


if __name__ == "__main__":
    raise SystemExit(main())
