"""Per-point ratios of two benchmark runs (base vs head) of tools/bench_sparse.py and tools/bench_dilated.py.

    python tools/compare_runs.py BASE_DIR HEAD_DIR --out DIR --name NAME

Each directory holds one run's JSON reports (sparse_*.json, dilated_*.json). Writes NAME.md (table:
base ms, head ms, head/base time ratio per point and measure), NAME.json and NAME.png (the ratios,
with hardware and versions), and prints the table. A ratio above 1 means head is slower.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPARSE_MEASURES = ("ours_fwd_ms", "ours_fwdbwd_ms")
DILATED_MEASURES = ("ours_fwd_ms", "ours_fb_ms")


def _one(folder: Path, prefix: str) -> dict[str, Any]:
    found = sorted(p for p in folder.glob(f"{prefix}*.json") if not p.name.endswith(".partial.json"))
    if len(found) != 1:
        raise SystemExit(f"expected one {prefix}*.json in {folder}, found {[p.name for p in found]}")
    return json.loads(found[0].read_text())


# Key fields older runs did not record, with the value they had then (bench_dilated swept H=16,
# MHA, non-causal only before it took --heads and --causal).
KEY_DEFAULTS: dict[str, Any] = {"H": 16, "Hkv": 16, "causal": False}


def _points(run: dict[str, Any], key_fields: tuple[str, ...], measures: tuple[str, ...]) -> dict[tuple, dict]:
    points: dict[tuple, dict] = {}
    for r in run["rows"]:
        key = tuple(r[f] if f in r else KEY_DEFAULTS[f] for f in key_fields)
        if key in points:
            raise SystemExit(f"two rows measured the same point {dict(zip(key_fields, key))}: add a key field")
        points[key] = {m: r[m] for m in measures}
    return points


def compare(base_dir: Path, head_dir: Path) -> dict[str, Any]:
    rows = []
    for bench, prefix, keys, measures in (
        ("sparse", "sparse_", ("n", "pattern", "density_target"), SPARSE_MEASURES),
        ("dilated", "dilated_", ("H", "Hkv", "causal", "D", "mode", "N"), DILATED_MEASURES),
    ):
        base, head = _one(base_dir, prefix), _one(head_dir, prefix)
        b_pts, h_pts = _points(base, keys, measures), _points(head, keys, measures)
        if b_pts.keys() != h_pts.keys():
            raise SystemExit(f"{bench}: the runs measured different points: {sorted(b_pts)} vs {sorted(h_pts)}")
        for key in b_pts:
            for m in measures:
                b, h = b_pts[key][m], h_pts[key][m]
                rows.append(dict(bench=bench, point=dict(zip(keys, key)), measure=m, base_ms=b, head_ms=h, ratio=h / b))
    return dict(env=_one(head_dir, "sparse_")["env"], rows=rows)


def render(result: dict[str, Any], name: str) -> str:
    env = result["env"]
    worst = max(r["ratio"] for r in result["rows"])
    lines = [
        f"# {name}: head vs base, same run",
        "",
        f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}. Time ratio head/base "
        f"(above 1: head slower). Slowest point: {worst:.3f}.",
        "",
        "| bench | point | measure | base ms | head ms | head/base |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        point = ", ".join(f"{k}={v}" for k, v in r["point"].items())
        lines.append(
            f"| {r['bench']} | {point} | {r['measure']} | {r['base_ms']:.2f} | {r['head_ms']:.2f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['bench']} " + " ".join(str(v) for v in r["point"].values()) + f" {r['measure']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), ratios, color=["tab:red" if x > 1.02 else "tab:blue" for x in ratios])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1.02, color="tab:red", lw=0.8, ls="--", label="2% slower")
    lo = min(min(ratios), 0.95)
    ax.set_xlim(lo, max(max(ratios), 1.05))
    ax.set_xlabel("time head / base (above 1: head slower)")
    ax.legend(fontsize=7, loc="lower right")
    env = result["env"]
    ax.set_title(f"{name}: {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("head", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="before_after")
    args = ap.parse_args()
    result = compare(args.base, args.head)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = render(result, args.name)
    (args.out / f"{args.name}.md").write_text(md)
    plot(result, args.out / f"{args.name}.png", args.name)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
