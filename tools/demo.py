"""The main job: run every capability against the float64 reference and report.

On the machine it finds (CPU by default, all GPUs when present) each section in
tools/demo_sections/ runs its capability, checks it against attn_core.reference, and returns
rows (kind, backend chosen and why, max error, time). The table is printed; a markdown report,
JSON and PNG plots go to --out (default demo-output/). Exit status 1 if any check failed.

    python tools/demo.py [--out demo-output] [--only dilated,sparse]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class DemoRow:
    kind: str
    backend: str
    why: str
    max_error: float | None
    tolerance: float | None
    time_ms: float | None
    ok: bool
    note: str = ""


@dataclass
class DemoContext:
    out_dir: Path
    device: str
    num_gpus: int
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def save_plot(self, fig: object, name: str) -> Path:
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
        self.plots.append(path.name)
        return path


def grad_run(fn, q, k, v, dout) -> list:  # type: ignore[no-untyped-def]
    """[out, dq, dk, dv] of ``fn(q, k, v)`` on fresh leaves, with upstream gradient ``dout``."""
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def timed_grad_run(fn, q, k, v, dout) -> tuple[list, float]:  # type: ignore[no-untyped-def]
    """grad_run after one warm-up call (compilation, caches); returns (results, fwd+bwd ms)."""
    import torch

    grad_run(fn, q, k, v, dout)
    if q.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = grad_run(fn, q, k, v, dout)
    if q.is_cuda:
        torch.cuda.synchronize()
    return got, (time.perf_counter() - t0) * 1e3


def reference_rows(
    kind: str, got: list, ref: list, base: list, *, choice: Any, ran: str, time_ms: float, note: str
) -> list[DemoRow]:
    """A "fwd" row (out) and a "bwd" row (worst of dq, dk, dv) checked with the project's tolerance rule.

    got / ref / base: [out, dq, dk, dv] from the code under test, the float64 reference and plain
    PyTorch in the tested dtype. choice: the backend "auto" explained (a BackendChoice); ran: the
    backend that actually ran, which must be the one explained for the rows to pass.
    """
    from attn_core.testing import assert_close_to_reference, max_abs_error, tolerance

    ok = ran == choice.backend
    why = choice.why + ("" if ok else f" (explain said {choice.backend})")
    rows = []
    for label, idx in (("fwd", [0]), ("bwd", [1, 2, 3])):
        passed, errs, tols, notes = ok, [], [], []
        for i in idx:
            errs.append(max_abs_error(got[i], ref[i]))
            tols.append(tolerance(got[i], ref[i], base[i]))
            try:
                assert_close_to_reference(("out", "dq", "dk", "dv")[i], got[i], ref[i], base[i])
            except AssertionError as exc:
                passed = False
                notes.append(str(exc))
        worst = max(range(len(errs)), key=lambda j: errs[j] / max(tols[j], 1e-30))
        rows.append(
            DemoRow(
                kind=kind.format(label=label),
                backend=ran,
                why=why,
                max_error=errs[worst],
                tolerance=tols[worst],
                time_ms=time_ms if label == "fwd" else None,
                ok=passed,
                note="; ".join(notes) or note,
            )
        )
    return rows


SECTIONS = ["dilated", "longnet", "hf", "sparse", "ring", "memory"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# a reason up to this long stays in its row; longer ones become a numbered footnote under the table
INLINE_WHY = 40


def format_table(rows: list[DemoRow]) -> list[str]:
    """The result table: columns as wide as their widest cell; long texts said once, as footnotes.

    Many rows share one long reason (every sparse row explains the same backend choice) or note,
    so each long "why", and each long note that several rows share, gets a number: the rows show
    "[n]" and the texts follow the table.
    """
    footnotes: dict[str, int] = {}
    note_counts: dict[str, int] = {}
    for r in rows:
        note_counts[r.note] = note_counts.get(r.note, 0) + 1

    def ref(text: str) -> str:
        return f"[{footnotes.setdefault(text, len(footnotes) + 1)}]"

    def why_cell(r: DemoRow) -> str:
        why = r.why if len(r.why) <= INLINE_WHY else ref(r.why)
        if not r.note:
            return why
        note = ref(r.note) if len(r.note) > INLINE_WHY and note_counts[r.note] > 1 else r.note
        return f"{why} | {note}"

    cells = [
        [
            r.kind,
            r.backend,
            _fmt(r.max_error, ".2e"),
            _fmt(r.tolerance, ".2e"),
            _fmt(r.time_ms, ".2f"),
            "yes" if r.ok else "NO",
            why_cell(r),
        ]
        for r in rows
    ]
    names = ["kind", "backend", "max err", "tol", "ms", "ok", "why | note"]
    right = [False, False, True, True, True, True, False]
    widths = [max([len(names[i])] + [len(c[i]) for c in cells]) for i in range(len(names) - 1)]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join([*padded, values[-1]]).rstrip()

    header = line(names)
    out = [header, "-" * len(header), *(line(c) for c in cells)]
    if footnotes:
        out += ["", "why (backend choice) and notes that rows above refer to by number:"]
        out += [f"  [{n}] {why}" for why, n in footnotes.items()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    ap.add_argument("--only", default="", help="comma-separated section names")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    n_gpus = torch.cuda.device_count()
    ctx = DemoContext(args.out, "cuda" if n_gpus else "cpu", n_gpus)
    wanted = [s for s in args.only.split(",") if s] or SECTIONS
    rows: list[DemoRow] = []
    section_status: dict[str, str] = {}
    for name in wanted:
        try:
            mod = importlib.import_module(f"demo_sections.{name}")
        except ModuleNotFoundError as exc:
            section_status[name] = f"not available ({exc.name} missing)"
            continue
        t0 = time.perf_counter()
        try:
            rows.extend(mod.run(ctx))
            section_status[name] = f"ran in {time.perf_counter() - t0:.1f} s"
        except Exception as exc:  # a failing section is reported, and fails the demo
            traceback.print_exc()
            rows.append(DemoRow(name, "-", "-", None, None, None, False, f"{type(exc).__name__}: {exc}"))
            section_status[name] = "FAILED"

    table_lines = format_table(rows)
    table = "\n".join(table_lines)
    print(table)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if n_gpus else platform.processor() or "cpu",
        "num_gpus": n_gpus,
    }
    (args.out / "results.json").write_text(
        json.dumps({"env": env, "sections": section_status, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    report = ["# dilated-attention-pytorch demo", "", f"Environment: `{json.dumps(env)}`", "", "## Sections", ""]
    report += [f"- {k}: {v}" for k, v in section_status.items()]
    report += ["", "## Checks against the float64 reference", "", "```", table, "```", ""]
    report += [f"- {n}" for n in ctx.notes]
    report += [f"![{p}]({p})" for p in ctx.plots]
    (args.out / "report.md").write_text("\n".join(report) + "\n")
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed; report: {args.out / 'report.md'}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
