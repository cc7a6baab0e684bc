"""Tables of docs/scaling.md: LongNet attention on 2**30 tokens over W GPUs (CPU only, no GPU needed).

    source tools/srcpath.sh && python tools/scaling_plan.py

Every figure is computed here from shapes, attn_ring.plan_ring_dilated's byte counts and the
one-GPU measurements named below; they are PREDICTIONS, not measurements on several GPUs.

- Memory per GPU of one attention layer's forward+backward: q, k, v, o, dO, dq, dk, dv at bf16 and
  the fp32 LSE, plus the 6.5% extra the attn_core sdpa backend was measured to allocate
  (docs/benchmarks/dilated_h100.md), plus ring dilated's receive buffers (plan bytes) or the hybrid's
  all-to-all send and receive buffers (q, k, v and o once more, twice).
- Ring dilated exchange bytes: plan_ring_dilated at n = 262144 tokens per GPU (the smallest n whose
  shards hold the first four segments whole; the bytes do not depend on n beyond that,
  docs/ring_dilated.md), checked against 32 MiB x (W - 1) / W, which gives the larger W.
- Compute: attended (query, key) pairs x 4 D FLOPs (fwd), 3.5x for fwd+bwd, at the 418 TFLOP/s
  per H100 that the sdpa backend reached in head mode "all" at N = 256K and 1M
  (docs/benchmarks/dilated_h100.md; an assumption at the 1B configuration's longer segments), dense at
  the 559 TFLOP/s of cuDNN measured in the same run.
- Links: InfiniBand 50 GB/s per GPU across nodes, NVLink 450 GB/s inside a node of 8, as in
  docs/benchmarks/scaleout_h100.md.
"""

from __future__ import annotations

from bench_ring_dilated import attended_pairs

from attn_ring.ring_dilated import plan_ring_dilated

N = 2**30
D, ELEM, GIB, MIB = 128, 2, 2**30, 2**20
SEGMENTS = [2048, 8192, 65536, 262144, N]
RATES = [1, 2, 8, 32, N // 4096]
DILATED_TFLOPS, DENSE_TFLOPS = 418.0, 559.0  # one H100, fwd+bwd effective (docs/benchmarks/dilated_h100.md)
SDPA_EXTRA = 0.065  # extra memory of the dilated sdpa backend over q, k, v, o + grads (same file)
IB_GBPS, NVLINK_GBPS, GPUS_PER_NODE = 50.0, 450.0, 8
WORLDS = [64, 128, 256, 512, 1024]
MODELS = [(2, 2), (4, 4), (16, 4), (16, 16)]  # (H, Hkv), D = 128


def exchange_mib(W: int, H: int, Hkv: int, causal: bool) -> tuple[float, float]:
    """(forward K/V MiB received, backward fp32 dK/dV MiB sent) by the worst rank of ring dilated."""
    n = 262144
    segs, rates = [*SEGMENTS[:4], n * W], [*RATES[:4], n * W // 4096]
    plan = plan_ring_dilated(n * W, W, H, Hkv, segs, rates, is_causal=causal)
    worst = max(range(W), key=lambda r: plan.ranks[r].rows_received)
    fwd = plan.bytes_received(worst, batch=1, head_dim=D, element_size=ELEM) / MIB
    sender = max(range(W), key=lambda r: plan.ranks[r].rows_sent)
    bwd = plan.bytes_sent(sender, batch=1, head_dim=D, element_size=4) / MIB
    return fwd, bwd


def formula_mib(W: int, Hkv: int) -> float:
    """Forward MiB of the last group (w = N, r = N/4096 >= H): Hkv x 4096 rows x (W-1)/W, K and V."""
    return 2 * D * ELEM * Hkv * 4096 * (W - 1) / W / MIB


def main() -> None:
    print("## Exchange of ring dilated attention per layer, worst rank (plan_ring_dilated)\n")
    print("| W | H | Hkv | causal | fwd K/V received MiB (plan) | bwd fp32 dK/dV sent MiB (plan) | formula fwd MiB |")
    print("|---|---|---|---|---|---|---|")
    for W in (2, 4, 8):
        for causal in (False, True):
            f, b = exchange_mib(W, 16, 16, causal)
            print(f"| {W} | 16 | 16 | {causal} | {f:.1f} | {b:.1f} | {formula_mib(W, 16):.1f} |")
            assert abs(f - formula_mib(W, 16)) < 1e-9, (W, f)  # the formula used for large W below

    print("\n## Memory per GPU, one attention layer fwd+bwd at N = 2**30 tokens, bf16, D = 128 (GiB)\n")
    print("| W | tokens/GPU | " + " | ".join(f"H={h} Hkv={kv}: ring dilated / hybrid" for h, kv in MODELS) + " |")
    print("|---|---|" + "---|" * len(MODELS))
    for W in WORLDS:
        n = N // W
        cells = []
        for H, Hkv in MODELS:
            tensors = n * (4 * H + 4 * Hkv) * D * ELEM + n * H * 4
            base = tensors * (1 + SDPA_EXTRA)
            ring = base + formula_mib(W, Hkv) * MIB * 3  # bf16 K/V received + their fp32 gradients
            hybrid = base + 2 * n * (2 * H + 2 * Hkv) * D * ELEM  # all-to-all send + receive of q, k, v, o
            cells.append(f"{ring / GIB:.1f} / {hybrid / GIB:.1f}")
        print(f"| {W} | {n // 2**20}M | " + " | ".join(cells) + " |")

    print("\n## Predicted time of one attention layer fwd+bwd per GPU at N = 2**30, H = Hkv = 16, D = 128\n")
    print(
        "| W | causal | compute s (dilated) | ring dilated exchange s (IB) | ring dilated s | "
        "hybrid all-to-all s (NVLink) | hybrid dilated s | dense compute s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    H = Hkv = 16
    for W in WORLDS:
        n = N // W
        for causal in (False, True):
            pairs = attended_pairs(N, H, SEGMENTS, RATES, causal)
            compute = 3.5 * 4 * D * pairs / W / (DILATED_TFLOPS * 1e12)
            fwd = formula_mib(W, Hkv) * MIB
            exchange = (fwd + fwd * 4 / ELEM) / (IB_GBPS * 1e9)  # not overlapped: counted in full
            A = GPUS_PER_NODE
            # hybrid: q, k, v in and o out (fwd), their gradients (bwd); (A-1)/A of each leaves the GPU.
            # The ring across nodes of the hybrid then holds A*n tokens per rank: no segment but the
            # last spans ranks, its exchange is that of a W/A ring (smaller than the ring's).
            a2a = 2 * n * (2 * H + 2 * Hkv) * D * ELEM * (A - 1) / A / (NVLINK_GBPS * 1e9)
            ring_h = W // A
            ex_h = (formula_mib(ring_h, Hkv // A) * MIB * 3) / (IB_GBPS * 1e9) if ring_h > 1 else 0.0
            dense_pairs = N * (N + 1) / 2 if causal else float(N) * N
            dense = 3.5 * 4 * D * dense_pairs * H / W / (DENSE_TFLOPS * 1e12)
            print(
                f"| {W} | {causal} | {compute:.3f} | {exchange:.4f} | {compute + exchange:.3f} | "
                f"{a2a:.3f} | {compute + a2a + ex_h:.3f} | {dense:,.0f} |"
            )


if __name__ == "__main__":
    main()
