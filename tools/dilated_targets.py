"""The LongNet benchmark's configuration, pair counts and targets (no GPU needed).

Used by tools/bench_dilated.py: the segment/rate configuration, the sweep's parsers, the attended
pair counts behind effective TFLOP/s, the efficiency columns and the target checks of the causal
LongNet issue (causal fwd+bwd >= 0.75 of dense causal cuDNN in both head modes, non-causal "all"
>= 0.85, no slower than the common algorithm at 16K/32K, extra memory <= 10 %).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SEGMENTS = [2048, 4096, 8192, 16384]
RATES = [1, 2, 4, 8]
MODES = ("split", "all")
CAUSAL_CHOICES = {"off": [False], "on": [True], "both": [False, True]}
CHECK_H = 16  # query heads of the correctness check
GIB = 1024**3
KI = 1024
HOST_CALLS = 5
# the targets: (H, Hkv, D) shapes, sequence lengths and thresholds
TARGET_SHAPES = ((32, 8, 128), (16, 16, 64))
TARGET_NS = (64 * KI, 256 * KI, 1024 * KI)
HOST_TARGET_NS = (16 * KI, 32 * KI)
CAUSAL_EFF = 0.75  # causal fwd+bwd vs dense causal cuDNN, both head modes
ALL_EFF = 0.85  # non-causal head_mode "all" fwd+bwd vs dense cuDNN
EXTRA_PCT = 10.0  # fwd+bwd extra memory, % of q, k, v, o and their gradients


def parse_n(text: str) -> list[int]:
    """Sequence lengths: "16K,1M,3000" -> [16384, 1048576, 3000]."""
    out = []
    for tok in text.split(","):
        t = tok.strip().upper()
        mult = KI * KI if t.endswith("M") else KI if t.endswith("K") else 1
        digits = t[:-1] if mult > 1 else t
        if not digits.isdigit() or int(digits) == 0:
            raise ValueError(f"sequence lengths are positive integers with an optional K or M suffix, got {tok!r}")
        out.append(int(digits) * mult)
    return out


def parse_heads(text: str) -> list[tuple[int, int]]:
    """(H, Hkv) pairs with H % Hkv == 0: "32/8,16/16" -> [(32, 8), (16, 16)]."""
    out = []
    for tok in text.split(","):
        parts = tok.strip().split("/")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) % int(parts[1]):
            raise ValueError(f"heads are H/Hkv pairs of positive integers with H % Hkv == 0, got {tok!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def fmt_n(n: int) -> str:
    if n % (KI * KI) == 0:
        return f"{n // (KI * KI)}M"
    return f"{n // KI}K" if n % KI == 0 else str(n)


def our_pairs(n: int, h: int, mode: str, causal: bool = False) -> int:
    """(query, key) pairs the sdpa backend computes, summed over groups and query heads (per batch row)."""
    from attn_core.config import DilatedConfig

    cfg = DilatedConfig(SEGMENTS, RATES, mode)
    total = 0
    for g, (w, r) in enumerate(zip(SEGMENTS, RATES)):
        full, tail = divmod(n, w)
        for j in cfg.heads_for_group(g, h):
            o = cfg.head_offset(g, j)
            for seglen, count in ((w, full), (tail, 1 if tail else 0)):
                rows = max(0, -(-(seglen - o) // r))
                total += count * (rows * (rows + 1) // 2 if causal else rows * rows)
    return total


def dense_pairs(n: int, causal: bool) -> int:
    """(query, key) pairs dense attention attends per head: N(N+1)/2 causal, N^2 otherwise."""
    return n * (n + 1) // 2 if causal else n * n


def io_bytes(n: int, h: int, hkv: int, d: int, itemsize: int = 2) -> int:
    """Bytes of q, k, v, o and their gradients (B=1): q, o (N, H, D); k, v (N, Hkv, D)."""
    return 2 * (2 * n * h * d + 2 * n * hkv * d) * itemsize


def point_label(key: tuple[int, int, int, bool, str, int]) -> str:
    h, hkv, d, causal, mode, n = key
    return f"{h}/{hkv} D={d} {'causal' if causal else 'non-causal'} {mode} N={fmt_n(n)}"


def add_efficiency(row: dict[str, Any], dense: dict[tuple[int, int, bool, int], dict[str, float]]) -> None:
    """Dense cuDNN's rate for the row (same H, D, causal; at N, else the largest N it ran at) and our share of it."""
    same = sorted(m for (h, d, c, m) in dense if (h, d, c) == (row["H"], row["D"], row["causal"]))
    if not same:
        return
    ref_n = row["N"] if row["N"] in same else same[-1]
    rec = dense[(row["H"], row["D"], row["causal"], ref_n)]
    row.update(dense_n=ref_n, dense_other_n=ref_n != row["N"])
    row.update(dense_fwd_tflops=rec["fwd_tflops"], dense_fb_tflops=rec["fb_tflops"])
    if "ours_fb_tflops" in row:
        row["eff_fwd"] = row["ours_fwd_tflops"] / rec["fwd_tflops"]
        row["eff_fb"] = row["ours_fb_tflops"] / rec["fb_tflops"]


def check_target(
    name: str,
    keys: list[tuple[int, int, int, bool, str, int]],
    rows: dict[tuple, dict[str, Any]],
    value: Callable[[dict[str, Any]], float | None],
    limit: float,
    at_least: bool,
    spec: str,
) -> dict[str, Any]:
    """One target over its points: met (every point measured and within limit), not met, or incomplete."""
    got = [(v, key) for key in keys if key in rows and (v := value(rows[key])) is not None]
    if not got:
        return dict(target=name, status="not measured", text=f"{name}: not measured (0 of {len(keys)} points)")
    bad = [(v, key) for v, key in got if (v < limit if at_least else v > limit)]
    worst_v, worst_key = (min if at_least else max)(got, key=lambda vk: vk[0])
    status = "not met" if bad else "met" if len(got) == len(keys) else "incomplete"
    text = (
        f"{name}: {status.upper()}: worst {format(worst_v, spec)} at {point_label(worst_key)}; "
        f"{len(bad)} of {len(got)} measured points miss {format(limit, spec)}; {len(got)}/{len(keys)} points measured"
    )
    return dict(target=name, status=status, worst=worst_v, worst_point=point_label(worst_key), text=text)


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets' summary lines from the sweep's rows (points the sweep did not cover count as unmeasured)."""
    by_key = {(r["H"], r["Hkv"], r["D"], r["causal"], r["mode"], r["N"]): r for r in rows}

    def keys(causals: tuple[bool, ...], modes: tuple[str, ...], ns: tuple[int, ...]) -> list[tuple]:
        return [(h, hkv, d, c, m, n) for h, hkv, d in TARGET_SHAPES for c in causals for m in modes for n in ns]

    def slower(r: dict[str, Any]) -> float | None:
        return min(r["speedup_fwd"], r["speedup_fb"]) if "speedup_fb" in r else None

    out = [
        check_target(
            f"causal fwd+bwd >= {CAUSAL_EFF} x dense causal cuDNN, both head modes",
            keys((True,), MODES, TARGET_NS), by_key, lambda r: r.get("eff_fb"), CAUSAL_EFF, True, ".2f",
        ),
        check_target(
            f"non-causal 'all' fwd+bwd >= {ALL_EFF} x dense cuDNN",
            keys((False,), ("all",), TARGET_NS), by_key, lambda r: r.get("eff_fb"), ALL_EFF, True, ".2f",
        ),
        check_target(
            "N=16K/32K no slower than the common algorithm (rate ratio, min of fwd and fwd+bwd)",
            keys((False, True), MODES, HOST_TARGET_NS), by_key, slower, 1.0, True, ".2f",
        ),
        check_target(
            f"fwd+bwd extra memory <= {EXTRA_PCT:.0f}% of q, k, v, o and grads (%)",
            keys((False, True), MODES, HOST_TARGET_NS + TARGET_NS), by_key,
            lambda r: r.get("extra_pct_fb"), EXTRA_PCT, False, ".1f",
        ),
    ]  # fmt: skip
    host_rows = [
        by_key[k] for k in keys((False, True), MODES, HOST_TARGET_NS) if "ours_fb" in by_key.get(k, {}).get("host", {})
    ]
    if host_rows:
        bound = sum(r["host"]["ours_fb"]["bound"] == "host" for r in host_rows)
        out[2]["text"] += f"; ours fwd+bwd host-bound at {bound} of {len(host_rows)} points (host table)"
    return out
