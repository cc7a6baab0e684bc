"""bigbird's random draws (a counter-based hash) and its Triton builder (kernels.pattern_build).

The Triton builder runs here in Triton's CPU interpreter on CPU tensors and must give the torch
builder's CSR bit for bit, and the transposed CSR that BlockLayout computes by sorting. Shapes
are small: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import os

# Kernels are decorated at import: the interpreter must be selected before attn_sparse.kernels loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

from attn_sparse import BlockLayout, bigbird, csr, patterns
from attn_sparse.hashing import MASK32, mix32, random_blocks, seed_key
from attn_sparse.kernels import interpret_mode
from attn_sparse.kernels.pattern_build import bigbird_tile_bound

CPU = torch.device("cpu")
# the Triton builder takes CPU tensors in the interpreter only (set above unless TRITON_INTERPRET=0 was given,
# e.g. to run the CUDA test at the end on a GPU machine)
needs_interpreter = pytest.mark.skipif(not interpret_mode(), reason="needs TRITON_INTERPRET=1 (CPU tensors)")


def _build(params: dict, *, triton: bool) -> BlockLayout:
    p = {"seed": 0, "num_heads": 1, "block_size": (16, 16)} | params
    return patterns._bigbird(
        p["seq_len"], p["window"], p["global_tokens"], p["random_blocks"], p["seed"], p["num_heads"], p["block_size"],
        "cpu", triton=triton,
    )  # fmt: skip


def _sorted_transpose(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed CSR by BlockLayout's own sort (a fresh, validated layout has none attached)."""
    fresh = BlockLayout.from_csr(
        layout.crow_indices.cpu(),
        layout.col_indices.cpu(),
        block_size=layout.block_size,
        num_key_blocks=layout.num_key_blocks,
        num_heads=layout.num_heads,
    )
    return fresh.transposed_csr()


def _bound(params: dict) -> int:
    p = {"num_heads": 1, "block_size": (16, 16)} | params
    return bigbird_tile_bound(
        p["seq_len"], p["block_size"], p["window"], p["global_tokens"], p["random_blocks"], p["num_heads"]
    )


def _assert_same_build(params: dict, fused: BlockLayout) -> None:
    want = _build(params, triton=False)
    assert want.nnz <= _bound(params), params  # the Triton build sizes its outputs by this bound
    assert (fused.shape, fused.block_size) == (want.shape, want.block_size), params
    for got, ref in ((fused.crow_indices, want.crow_indices), (fused.col_indices, want.col_indices)):
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), ref), params
    assert "transposed" in fused._cache, params  # attached by the builder: transposed_csr() does not sort
    # 16-byte aligned (Triton specialises pointers on it: a misaligned view recompiles the attention kernels)
    assert all(t.data_ptr() % 16 == 0 for t in (fused.crow_indices, fused.col_indices, *fused.transposed_csr()))
    for got, ref in zip(fused.transposed_csr(), _sorted_transpose(want)):
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), ref), params


# (seq_len, window, global_tokens, random_blocks, num_heads, block_size) around every edge:
# nothing but the window, global rows of every column, Bq != Bk both ways, partial last blocks,
# more draws than key blocks (duplicates), rows and draw lists longer than one ROW_CHUNK (128)
EDGE_CASES = [
    (1, 0, 0, 0, 1, (16, 16)),
    (1, 0, 0, 3, 2, (16, 16)),
    (37, 0, 0, 0, 1, (16, 32)),
    (200, 0, 0, 2, 1, (32, 16)),
    (200, 5, 200, 4, 2, (16, 16)),  # every query block is global: all rows hold all columns
    (200, 1000, 0, 1, 1, (16, 16)),  # the window spans the sequence
    (333, 20, 50, 40, 2, (16, 32)),  # draws > key blocks: many duplicates
    (300, 40, 0, 300, 1, (32, 16)),  # 300 draws: three chunks of sorted draws per row
    (2100, 1500, 100, 5, 1, (64, 16)),  # 132 key blocks: windows and global rows over one chunk
    (2100, 30, 300, 200, 1, (128, 16)),
]


@needs_interpreter
@pytest.mark.parametrize(("n", "w", "g", "r", "heads", "bs"), EDGE_CASES)
def test_triton_build_equals_torch_build_edges(n: int, w: int, g: int, r: int, heads: int, bs: tuple) -> None:
    params = {"seq_len": n, "window": w, "global_tokens": g, "random_blocks": r, "num_heads": heads}
    params |= {"block_size": bs, "seed": n + r}
    _assert_same_build(params, _build(params, triton=True))


@needs_interpreter
def test_triton_build_equals_torch_build_random_parameters() -> None:
    rng = random.Random(20261123)
    for _ in range(16):
        bq, bk = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        n = rng.randint(1, 700)
        heads = rng.randint(1, 3)
        if heads * -(-n // bq) > 40:  # the interpreter runs one program per row
            n = 40 // heads * bq
        params = _random_params(rng, n, heads, (bq, bk)) | {"seed": rng.choice([0, rng.randint(-(2**70), 2**70)])}
        _assert_same_build(params, _build(params, triton=True))


def _random_params(rng: random.Random, n: int, heads: int, block_size: tuple[int, int]) -> dict:
    """bigbird parameters around their edges: no window / global / draws, or spanning the sequence,
    and more draws than key blocks."""
    bq, bk = block_size
    nk = -(-n // bk)
    return {
        "seq_len": n,
        "window": rng.choice([0, rng.randint(0, 3 * bq), rng.randint(0, n + 40)]),
        "global_tokens": rng.choice([0, rng.randint(1, 2 * bq), rng.randint(0, n + 40)]),
        "random_blocks": rng.choice([0, 1, rng.randint(1, 8), rng.randint(nk, 2 * nk + 3)]),
        "num_heads": heads,
        "block_size": block_size,
    }


def test_tile_bound_holds_over_random_parameters() -> None:
    # the bound the Triton build sizes its outputs by, against the torch builder's exact count
    rng = random.Random(20261204)
    for _ in range(300):
        bq, bk = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
        params = _random_params(rng, rng.randint(1, 5000), rng.randint(1, 3), (bq, bk))
        params["seed"] = rng.randint(0, 2**40)
        assert _build(params, triton=False).nnz <= _bound(params), params


@needs_interpreter
@pytest.mark.parametrize("bound", ["short", "over the allocation cap"])
def test_triton_build_without_its_bound_equals_torch_build(monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    # a bound short of nnz (the build then runs again at the exact size), or one too large to
    # allocate up front (the build reads nnz first): the layout is the same either way
    from attn_sparse.kernels import pattern_build

    runs: list[object] = []
    real = pattern_build._bigbird_csr
    monkeypatch.setattr(pattern_build, "_bigbird_csr", lambda *a: runs.append(a[-1]) or real(*a))
    if bound == "short":
        monkeypatch.setattr(pattern_build, "bigbird_tile_bound", lambda *a: 5)
    else:
        monkeypatch.setattr(pattern_build, "BOUND_ALLOCATION_MAX_TILES", 0)
    params = {"seq_len": 333, "window": 20, "global_tokens": 50, "random_blocks": 6, "num_heads": 2}
    params |= {"block_size": (16, 32), "seed": 3}
    _assert_same_build(params, _build(params, triton=True))
    assert runs == ([5, None] if bound == "short" else [_bound(params)]), runs


@needs_interpreter
def test_triton_build_counts_its_slack_in_nbytes() -> None:
    # the outputs are sized by the bound: nbytes (what a LayoutCache charges) counts that memory
    params = {"seq_len": 333, "window": 20, "global_tokens": 50, "random_blocks": 6, "block_size": (16, 32)}
    layout = _build(params, triton=True)
    exact = (layout.crow_indices.numel() + layout.nnz) * 4
    assert layout.nnz < _bound(params) and layout.nbytes >= exact + (_bound(params) - layout.nnz) * 4


def test_hash_draws_are_deterministic_exact_and_in_range() -> None:
    for seed in (0, 1, -1, 2**63, -(2**63), 12345678901234567890):
        key = seed_key(seed)
        assert 0 <= key <= MASK32 and key == seed_key(seed)
        for nk in (1, 2, 3, 1000, 2**31 - 1):
            d = random_blocks(key, 3, 5, nk, 7, CPU)
            assert d.shape == (3, 5, 7) and d.dtype == torch.int64
            assert int(d.min()) >= 0 and int(d.max()) < nk
            assert torch.equal(d, random_blocks(key, 3, 5, nk, 7, CPU))
            # int64 tensors give what unbounded Python ints give: no product overflows
            for h, q, t in ((0, 0, 0), (2, 4, 6), (1, 3, 2)):
                x = mix32(mix32(mix32(key ^ h) ^ q) ^ t)
                assert int(d[h, q, t]) == (x * nk) >> 32
    assert seed_key(-1) == seed_key(2**64 - 1) and seed_key(-1) != seed_key(1)  # seeds modulo 2**64
    # pinned: a change of the hash (constants, mixing order, mapping) changes every bigbird layout
    assert random_blocks(seed_key(0), 1, 1, 1000, 8, CPU).flatten().tolist() == [867, 542, 23, 932, 481, 336, 141, 607]


def test_hash_draws_are_uniform_and_independent() -> None:
    # chi-square over ~36 and 63 degrees of freedom: expected ~36 / ~63, sd ~8.5 / ~11; the draws are
    # a fixed function of the seed, so the bounds (7+ sd) only guard against a broken hash
    for seed in (0, 7, -3, 2**40):
        d = random_blocks(seed_key(seed), 4, 128, 37, 64, CPU)  # 32768 draws over 37 blocks
        counts = torch.bincount(d.flatten(), minlength=37).double()
        expected = d.numel() / 37
        assert float(((counts - expected) ** 2 / expected).sum()) < 100, seed
        b = random_blocks(seed_key(seed), 4, 128, 8, 64, CPU)
        for first, second in ((b[..., :-1], b[..., 1:]), (b[:, :-1], b[:, 1:]), (b[:-1], b[1:])):
            # consecutive draws of a row, the same draw of adjacent query blocks, adjacent heads
            pairs = torch.bincount((first * 8 + second).flatten(), minlength=64).double()
            expected = first.numel() / 64
            assert float(((pairs - expected) ** 2 / expected).sum()) < 150, seed


@needs_interpreter
def test_seeds_give_different_layouts() -> None:
    params = {"seq_len": 320, "window": 16, "global_tokens": 16, "random_blocks": 2, "num_heads": 2}
    torch_layouts = [_build(params | {"seed": s}, triton=False) for s in (0, 1, 2, -1, 2**64 - 2)]
    for i, a in enumerate(torch_layouts):
        assert all(a != b for b in torch_layouts[i + 1 :])
    assert _build(params | {"seed": -1}, triton=False) == _build(params | {"seed": 2**64 - 1}, triton=False)
    fused = [_build(params | {"seed": s}, triton=True) for s in (0, 1)]
    assert fused[0] == torch_layouts[0] and fused[1] == torch_layouts[1] and fused[0] != fused[1]


def _random_runs(rng: random.Random, rows: int, per_row: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) (rows, per_row) int64: disjoint increasing strided runs per row, some empty."""
    start = torch.zeros(rows, per_row, dtype=torch.int64)
    length = torch.zeros(rows, per_row, dtype=torch.int64)
    for r in range(rows):
        pos = rng.randint(0, 5)
        for t in range(per_row):
            n = rng.choice([0, 0, 1, rng.randint(1, 40), rng.randint(200, 700)])  # > one RUN_CHUNK too
            start[r, t], length[r, t] = pos, n
            pos += n * step + rng.randint(0, 9)
    return start, length


@needs_interpreter
@pytest.mark.parametrize(("rows", "per_row", "step"), [(1, 1, 1), (7, 1, 1), (9, 3, 1), (5, 4, 7), (6, 2, 16)])
def test_triton_run_expansion_equals_torch(rows: int, per_row: int, step: int) -> None:
    rng = random.Random(rows * 100 + per_row * 10 + step)
    for _ in range(3):
        start, length = _random_runs(rng, rows, per_row, step)
        want = csr.expand_intervals(start, length, rows, step=step, triton=False)
        for device in (None, CPU):  # rows where they are, or "copied" to the layout's device
            got = csr.expand_intervals(start, length, rows, step=step, device=device, triton=True)
            for g, w in zip(got, want):
                assert g.dtype == torch.int32 and torch.equal(g, w) and g.data_ptr() % 16 == 0
    empty = csr.expand_intervals(
        torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 3, triton=True
    )
    assert empty[0].tolist() == [0, 0, 0, 0] and empty[1].numel() == 0


# every interval pattern once more with its O(nnz) expansion in the Triton kernel (as on a GPU)
RUN_PATTERNS = [
    ("local_window", {"seq_len": 3001, "window": 300, "block_size": 64}),
    ("local_window", {"seq_len": 1000, "window": 0, "block_size": (16, 32)}),
    ("causal", {"seq_len": 2000, "block_size": (32, 64)}),
    ("dilated", {"seq_len": 3000, "stride": 7, "block_size": 32}),
    ("global_local", {"seq_len": 2999, "window": 200, "global_tokens": 70, "block_size": (32, 16)}),
    ("hierarchical", {"seq_len": 3001, "windows": [100, 800, 3001], "strides": [1, 3, 16], "block_size": 32}),
    (
        "longnet",
        {"seq_len": 2048, "segment_lengths": [256, 1024], "dilation_rates": [1, 4], "num_heads": 3, "block_size": 64},
    ),
    (
        "bigbird",
        {"seq_len": 1000, "window": 40, "global_tokens": 20, "random_blocks": 3, "num_heads": 2, "block_size": 32},
    ),
]


@needs_interpreter
@pytest.mark.parametrize(("kind", "params"), RUN_PATTERNS)
def test_patterns_with_triton_run_expansion_equal_torch_builds(
    kind: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = patterns.build_pattern(kind, **params)
    want_t = _sorted_transpose(want)
    monkeypatch.setattr(csr, "compiled_triton_available", lambda device: True)
    got = patterns.build_pattern(kind, **params)
    assert got == want, kind
    for g, w in zip(got.transposed_csr(), want_t):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), w), kind


def test_host_floor_sums_and_window_offsets_are_exact() -> None:
    # the host half of local_window's builder (the tile count that sizes the output) by brute force
    from attn_sparse.kernels.pattern_build import _floor_sum_host, _window_offset_host

    rng = random.Random(11)
    for _ in range(3000):
        n, m, a, b = rng.randint(-2, 70), rng.randint(1, 60), rng.randint(0, 200), rng.randint(0, 500)
        assert _floor_sum_host(n, m, a, b) == sum((a * i + b) // m for i in range(max(n, 0))), (n, m, a, b)
    for _ in range(300):
        bq, bk = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
        n = rng.randint(1, 5000)
        w = min(rng.choice([0, rng.randint(0, 3 * bq), rng.randint(0, n + 50)]), n)
        nq, nk = -(-n // bq), -(-n // bk)
        lengths = [min(q * bq + bq - 1 + w, n - 1) // bk + 1 - max(q * bq - w, 0) // bk for q in range(nq)]
        for q in {0, 1, nq // 2, nq - 1, nq}:
            assert _window_offset_host(q, n, bq, bk, w, nk) == sum(lengths[:q]), (q, n, bq, bk, w)


@needs_interpreter
def test_triton_local_window_equals_torch_build(monkeypatch: pytest.MonkeyPatch) -> None:
    # local_window's one-launch builder (closed-form row offsets) against the torch build: edges
    # (one token, window 0, windows past the sequence, Bq != Bk both ways, partial last blocks) and random
    rng = random.Random(7)
    cases = [(1, 0, (16, 16)), (1, 5, (32, 16)), (37, 0, (16, 32)), (200, 1000, (16, 16)), (300, 17, (64, 16))]
    cases += [(1000, 16, (16, 16)), (2100, 900, (128, 16)), (513, 64, (32, 64))]
    for _ in range(12):
        bq, bk = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
        n = rng.randint(1, 40 * bq)
        cases.append((n, rng.choice([0, rng.randint(0, 3 * bq), rng.randint(0, n + 50)]), (bq, bk)))
    for n, w, bs in cases:
        want = patterns.local_window(n, w, block_size=bs)
        with monkeypatch.context() as m:
            m.setattr(patterns, "compiled_triton_available", lambda device: True)
            got = patterns.local_window(n, w, block_size=bs)
        assert got == want, (n, w, bs)
        assert got.crow_indices.dtype == torch.int32 and got.col_indices.dtype == torch.int32
        assert all(t.data_ptr() % 16 == 0 for t in (got.crow_indices, got.col_indices))
        assert ("transposed" in got._cache) == (bs[0] == bs[1]), (n, w, bs)
        for g, r in zip(got.transposed_csr(), _sorted_transpose(want)):
            assert torch.equal(g, r), (n, w, bs)


class _AlignmentSpy:
    """Wraps a Triton kernel: every tensor it is launched with must start 16-byte aligned (Triton
    specialises pointer arguments on it, so a misaligned view would compile a kernel variant)."""

    def __init__(self, kernel: object, seen: list) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid: object) -> object:
        launch = self.kernel[grid]  # type: ignore[index]

        def run(*args: object, **kwargs: object) -> object:
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.seen.append(a.data_ptr() % 16)
            return launch(*args, **kwargs)

        return run


@needs_interpreter
def test_build_kernels_get_aligned_pointers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_sparse.kernels import pattern_build as pb

    seen: list[int] = []
    for name in ("_count_kernel", "_expand_kernel", "_transpose_kernel", "_window_kernel", "_runs_kernel"):
        monkeypatch.setattr(pb, name, _AlignmentSpy(getattr(pb, name), seen))
    # odd row and column counts (and every residue of them mod 4): views at odd offsets would misalign
    for n in (1, 17, 33, 49, 65, 1001):
        _build({"seq_len": n, "window": 20, "global_tokens": 16, "random_blocks": 3, "num_heads": 1}, triton=True)
        with monkeypatch.context() as m:
            m.setattr(patterns, "compiled_triton_available", lambda device: True)
            m.setattr(csr, "compiled_triton_available", lambda device: True)
            patterns.local_window(n, 40, block_size=16)
            patterns.global_local(n, 40, 20, block_size=(16, 32))
    assert len(seen) > 50 and set(seen) == {0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_cuda_build_equals_cpu_build() -> None:
    # the bench's 128K layouts (tools/bench_sparse.py make_layout, densities 0.25 / 0.1 / 0.05) and more
    cases = [
        {"seq_len": 131072, "window": 5376, "global_tokens": 5376, "random_blocks": 129, "seed": 131072},
        {"seq_len": 131072, "window": 2112, "global_tokens": 2176, "random_blocks": 51, "seed": 131072},
        {"seq_len": 131072, "window": 1024, "global_tokens": 1024, "random_blocks": 26, "seed": 131072},
        {"seq_len": 100003, "window": 1000, "global_tokens": 300, "random_blocks": 5, "seed": -3, "num_heads": 4},
        {"seq_len": 1 << 20, "window": 2048, "global_tokens": 512, "random_blocks": 8, "seed": 1},
        {"seq_len": 50000, "window": 700, "global_tokens": 9000, "random_blocks": 300, "block_size": (64, 128)},
    ]
    for params in cases:
        params = {"block_size": (128, 128)} | params
        fused = bigbird(device="cuda", **params)
        assert fused.device.type == "cuda"
        _assert_same_build(params, fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("n", [131072, 100003])
def test_cuda_interval_builds_equal_cpu_builds(n: int) -> None:
    # the Triton run expansion on CUDA against the torch expansion on the CPU, CSR and transposed CSR
    cases = [
        ("local_window", {"window": 6272}),
        ("local_window", {"window": 4096, "block_size": 64}),
        ("local_window", {"window": 3000, "block_size": (64, 128)}),
        ("causal", {"block_size": (64, 128)}),
        ("dilated", {"stride": 16}),
        ("global_local", {"window": 4096, "global_tokens": 512}),
        ("hierarchical", {"windows": [2048, 32768, n], "strides": [1, 8, 64]}),
        ("longnet", {"segment_lengths": [2048, 8192], "dilation_rates": [1, 4], "num_heads": 16}),
    ]
    for kind, params in cases:
        params = {"seq_len": n} | params
        if kind == "longnet" and n % 8192:
            params["seq_len"] = n - n % 8192
        got, want = (patterns.build_pattern(kind, device=dev, **params) for dev in ("cuda", "cpu"))
        assert got.device.type == "cuda" and got == want, kind
        for g, w in zip(got.transposed_csr(), want.transposed_csr()):
            assert torch.equal(g.cpu(), w), kind
