"""Patterns: every tile set equals the tiles of its token-level definition (brute force on small cases)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from attn_core.reference import dilated_weights
from attn_sparse import (
    BlockLayout,
    bigbird,
    build_pattern,
    causal,
    dilated,
    global_local,
    hierarchical,
    local_window,
    longnet,
)
from attn_sparse.hashing import random_blocks, seed_key

SIZES = [1, 37, 128, 200]
BLOCKS = [(16, 16), (16, 32), (32, 16)]


def _tiles(tok: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """(H, N, N) token mask -> (H, nq, nk) tiles holding at least one attended pair."""
    H, N, _ = tok.shape
    nq, nk = -(-N // bq), -(-N // bk)
    t = torch.zeros(H, nq * bq, nk * bk, dtype=torch.bool)
    t[:, :N, :N] = tok
    return t.reshape(H, nq, bq, nk, bk).any(4).any(2)


def _ij(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.arange(n)
    return p[:, None], p[None, :]


def _revalidated(layout: BlockLayout) -> BlockLayout:
    """The same CSR through the validating constructor (a fresh layout: no transposed CSR attached)."""
    return BlockLayout.from_csr(
        layout.crow_indices,
        layout.col_indices,
        block_size=layout.block_size,
        num_key_blocks=layout.num_key_blocks,
        num_heads=layout.num_heads,
    )


def _csr_ok(layout: BlockLayout) -> None:
    # the builders skip validation: re-validating must accept their output unchanged
    assert _revalidated(layout) == layout


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bs", BLOCKS)
def test_local_window_global_local_causal(n: int, bs: tuple[int, int]) -> None:
    i, j = _ij(n)
    for w in (0, 5, 40):
        lay = local_window(n, w, block_size=bs)
        _csr_ok(lay)
        assert torch.equal(lay.to_dense(), _tiles(((i - j).abs() <= w)[None], *bs))
        for g in (0, 3, 40):
            tok = ((i - j).abs() <= w) | (j < g) | (i < g)
            assert torch.equal(global_local(n, w, g, block_size=bs).to_dense(), _tiles(tok[None], *bs))
    assert torch.equal(causal(n, block_size=bs).to_dense(), _tiles((j <= i)[None], *bs))
    # composition: causal window
    both = local_window(n, 20, block_size=bs) & causal(n, block_size=bs)
    assert torch.equal(both.to_dense(), _tiles((((i - j).abs() <= 20) & (j <= i))[None], *bs))
    assert local_window(n, 20, block_size=bs).tril() == both
    assert bigbird(n, 8, 8, 2, num_heads=2, block_size=bs).tril() == bigbird(
        n, 8, 8, 2, num_heads=2, block_size=bs
    ) & causal(n, block_size=bs)
    assert causal(n, block_size=bs).tril() == causal(n, block_size=bs)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bs", BLOCKS)
def test_dilated_and_hierarchical(n: int, bs: tuple[int, int]) -> None:
    bq, bk = bs
    nq, nk = -(-n // bq), -(-n // bk)
    qi = torch.arange(nq)[:, None]
    kj = torch.arange(nk)[None, :]
    diag = qi * bq // bk
    for stride in (1, 2, 3):
        lay = dilated(n, stride, block_size=bs)
        _csr_ok(lay)
        assert torch.equal(lay.to_dense()[0], (kj - diag) % stride == 0)
    windows, strides = (16, 64, n), (1, 2, 4)
    window_tiles = [local_window(n, w, block_size=bs).to_dense()[0] for w in windows]
    want = torch.zeros(nq, nk, dtype=torch.bool)
    for wt, s in zip(window_tiles, strides):
        want |= wt & ((kj - diag) % s == 0)
    lay = hierarchical(n, windows, strides, block_size=bs)
    _csr_ok(lay)
    assert torch.equal(lay.to_dense()[0], want)


@pytest.mark.parametrize("n", [37, 200, 256])
@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize(
    "cfg",
    [
        ([16], [1]),
        ([32, 64], [2, 4]),
        ([8, 16, 64], [1, 2, 8]),
        ([64], [64]),
        ([40, 20], [40, 5]),
        ([128, 256], [32, 64]),
    ],
)
def test_longnet_is_the_tile_set_of_dilated_attention(n: int, bs: tuple[int, int], cfg: tuple[list, list]) -> None:
    for heads, mode in ((1, "all"), (3, "all"), (8, "all"), (3, "split")):
        if mode == "split" and heads < len(cfg[0]):
            continue
        want = _tiles(dilated_weights(n, heads, *cfg, head_mode=mode) > 0, *bs)
        per_head = longnet(n, *cfg, num_heads=heads, head_mode=mode, per_head=True, block_size=bs)
        _csr_ok(per_head)
        assert torch.equal(per_head.to_dense(), want)
        shared = longnet(n, *cfg, num_heads=heads, head_mode=mode, block_size=bs)
        assert torch.equal(shared.to_dense()[0], want.any(0))


def test_bigbird_contains_global_local_and_is_reproducible() -> None:
    a = bigbird(1000, 40, 20, 3, seed=5, num_heads=2, block_size=16)
    b = bigbird(1000, 40, 20, 3, seed=5, num_heads=2, block_size=16)
    c = bigbird(1000, 40, 20, 3, seed=6, num_heads=2, block_size=16)
    _csr_ok(a)
    assert a == b and a != c
    base = global_local(1000, 40, 20, block_size=16).to_dense()
    dense = a.to_dense()
    assert bool((dense >= base).all())
    extra = (dense & ~base).sum(-1)
    assert int(extra.max()) <= 3 and int(extra.sum()) > 0
    assert not torch.equal(dense[0], dense[1])  # heads draw their own random blocks
    # the draws are the counter-based hash of (seed, head, query block, draw): no generator state
    rnd = random_blocks(seed_key(5), 2, a.num_query_blocks, a.num_key_blocks, 3, torch.device("cpu"))
    assert bool(dense.gather(2, rnd).all())


def test_build_pattern_and_errors() -> None:
    assert build_pattern("local_window", seq_len=100, window=10, block_size=16) == local_window(100, 10, block_size=16)
    with pytest.raises(ValueError, match="unknown pattern"):
        build_pattern("nope", seq_len=10)
    with pytest.raises(TypeError, match="local_window"):
        build_pattern("local_window", seq_len=100, windo=3)
    with pytest.raises(ValueError, match="seq_len"):
        local_window(0, 3)
    with pytest.raises(ValueError, match="window"):
        local_window(10, -1, block_size=16)
    with pytest.raises(TypeError, match="window"):
        local_window(10, 1.5, block_size=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride"):
        dilated(10, 0, block_size=16)
    with pytest.raises(ValueError, match="equal length"):
        hierarchical(10, (4, 8), (1,), block_size=16)
    with pytest.raises(ValueError, match="divisible"):
        longnet(64, [30], [4], num_heads=2, block_size=16)
    with pytest.raises(TypeError, match="seed"):
        bigbird(64, 4, 4, 1, seed=1.0, block_size=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="powers of two"):
        causal(64, block_size=48)


def test_large_pattern_builds_in_blocks_not_tokens() -> None:
    # N = 1M tokens: an N x N mask would need 1 TB; the layout holds O(active blocks)
    n = 1 << 20
    lay = bigbird(n, 512, 256, 3, block_size=128)
    assert lay.num_query_blocks == lay.num_key_blocks == 8192
    assert lay.nnz < 8192 * 20
    assert lay.max_blocks_per_row == 8192  # the global query block reads every key block


# sha256 (first 16 hex digits) of crow, col, ccol, row (int32 bytes) as built by the implementation
# before device= builds (commit 5eb5758: CPU construction, transposed CSR by a stable sort): the
# current builders, their attached transposes included, must give these layouts bit for bit.
# bigbird's two entries were re-recorded when its random blocks moved from a CPU torch.Generator to
# the counter-based hash of attn_sparse.hashing (same window and global tiles, other random blocks).
PREVIOUS_DIGESTS = [
    ("local_window", {"seq_len": 100003, "window": 3000, "block_size": 64}, "5dc49bc0be9a6f95"),
    ("local_window", {"seq_len": 65536, "window": 0}, "9f806e5499d07c45"),
    ("causal", {"seq_len": 100003, "block_size": (64, 128)}, "47a7bbe2e1f8383b"),
    ("causal", {"seq_len": 131072}, "da30b33ffa602053"),
    ("dilated", {"seq_len": 100003, "stride": 7, "block_size": 64}, "7eb778034bdefad9"),
    ("dilated", {"seq_len": 131072, "stride": 16, "block_size": (128, 64)}, "7d06e27e7ab82628"),
    ("global_local", {"seq_len": 99999, "window": 2000, "global_tokens": 700, "block_size": 64}, "36498e3b9e3c00df"),
    (
        "bigbird",
        {"seq_len": 100003, "window": 1000, "global_tokens": 300, "random_blocks": 5, "seed": 3, "num_heads": 2}
        | {"block_size": 64},
        "aa7307ea87ecdbf1",
    ),
    (
        "bigbird",
        {"seq_len": 131072, "window": 2048, "global_tokens": 512, "random_blocks": 8, "seed": 1},
        "ed2869eb7d8f25c0",
    ),
    (
        "hierarchical",
        {"seq_len": 100003, "windows": [1000, 8000, 100003], "strides": [1, 3, 16], "block_size": 64},
        "12147b8dc5acf4b0",
    ),
    (
        "hierarchical",
        {"seq_len": 131072, "windows": [2048, 32768, 131072], "strides": [1, 8, 64]},
        "80a5c4b2088409bf",
    ),
    (
        "longnet",
        {"seq_len": 131072, "segment_lengths": [2048, 8192, 65536], "dilation_rates": [1, 4, 16], "num_heads": 16},
        "54d8a88b317d2412",
    ),
    (
        "longnet",
        {"seq_len": 98304, "segment_lengths": [1024, 4096], "dilation_rates": [2, 256], "num_heads": 5}
        | {"per_head": True, "block_size": 64},
        "81c7c6125f02d7d2",
    ),
]


def _digest(layout: BlockLayout) -> str:
    h = hashlib.sha256()
    for t in (layout.crow_indices, layout.col_indices, *layout.transposed_csr()):
        h.update(t.to(torch.int32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("kind", "params", "digest"), PREVIOUS_DIGESTS)
def test_same_layouts_as_the_previous_implementation(kind: str, params: dict, digest: str) -> None:
    assert _digest(build_pattern(kind, device="cpu", **params)) == digest


def _sorted_transpose(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed CSR by the generic path (a fresh layout has none attached: it sorts)."""
    return _revalidated(layout).transposed_csr()


@pytest.mark.parametrize("n", [1, 37, 256, 1000])
@pytest.mark.parametrize("bs", [(16, 16), (16, 32), (32, 16), (64, 64)])
def test_attached_transposes_equal_the_sorted_transpose(n: int, bs: tuple[int, int]) -> None:
    cases = {
        "local_window": local_window(n, 40, block_size=bs),
        "causal": causal(n, block_size=bs),
        "dilated": dilated(n, 3, block_size=bs),
        "global_local": global_local(n, 50, 70, block_size=bs),
        "hierarchical": hierarchical(n, (16, 100, n), (1, 3, 7), block_size=bs),
        "bigbird": bigbird(n, 30, 20, 2, num_heads=2, block_size=bs),
    }
    if n % 64 == 0 or n < 64:
        for per_head in (False, True):
            cases[f"longnet{per_head}"] = longnet(
                n, [16, 64] if n % 64 == 0 else [n], [2, 8] if n % 64 == 0 else [1], num_heads=3, per_head=per_head,
                block_size=bs,
            )  # fmt: skip
    for name, lay in cases.items():
        # the builders attach the transpose (no sort) for causal and, with Bq == Bk, symmetric patterns
        attached = name == "causal" or (bs[0] == bs[1] and name != "bigbird")
        assert ("transposed" in lay._cache) == attached, name
        got, want = lay.transposed_csr(), _sorted_transpose(lay)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name


def test_device_argument() -> None:
    want = local_window(1000, 50, block_size=64)
    assert local_window(1000, 50, block_size=64, device=torch.device("cpu")) == want
    assert build_pattern("local_window", seq_len=1000, window=50, block_size=64, device="cpu") == want
    assert causal(300, block_size=16, device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        local_window(1000, 50, device="nonsense")
    with pytest.raises(TypeError, match="device"):
        causal(1000, device=3)  # type: ignore[arg-type]
