"""Hostile sizes, devices and arguments: a clear ValueError/TypeError naming the value, in bounded time and memory."""

from __future__ import annotations

import pytest
import torch

from attn_sparse import BlockLayout, patterns
from attn_sparse.layout import MAX_BLOCK_SIZE, MAX_NUM_BLOCKS, MAX_SEQ_LEN, MIN_BLOCK_SIZE
from attn_sparse.patterns import MAX_ROW_INTERVALS

HUGE = 2**40


def _dense(nq: int = 2, nk: int = 2) -> torch.Tensor:
    return torch.ones(1, nq, nk, dtype=torch.bool)


@pytest.mark.parametrize("block_size", [HUGE, 2 * MAX_BLOCK_SIZE, (16, HUGE), (HUGE, 16), 8, MIN_BLOCK_SIZE // 2])
def test_block_sizes_are_bounded_everywhere(block_size: object) -> None:
    match = rf"block sizes must be powers of two in \[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}\].*got"
    with pytest.raises(ValueError, match=match):
        BlockLayout.from_dense(_dense(), block_size)
    with pytest.raises(ValueError, match=match):
        BlockLayout.from_csr(torch.tensor([0, 1]), torch.tensor([0]), block_size=block_size, num_key_blocks=1)
    for name, build in patterns.PATTERNS.items():
        kwargs: dict[str, object] = {
            "local_window": {"window": 16},
            "causal": {},
            "dilated": {"stride": 2},
            "global_local": {"window": 16, "global_tokens": 16},
            "bigbird": {"window": 16, "global_tokens": 16, "random_blocks": 1},
            "hierarchical": {"windows": [64], "strides": [1]},
            "longnet": {"segment_lengths": [64], "dilation_rates": [1], "num_heads": 1},
            "documents": {"cu_seqlens": [0, 100, 256]},
        }[name]
        with pytest.raises(ValueError, match=match):
            build(seq_len=256, block_size=block_size, **kwargs)


@pytest.mark.parametrize("seq_len", [2**62, MAX_SEQ_LEN + 1, HUGE])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("causal", {}),
        ("local_window", {"window": 1}),
        ("dilated", {"stride": 2}),
        ("global_local", {"window": 1, "global_tokens": 1}),
        ("bigbird", {"window": 1, "global_tokens": 1, "random_blocks": 1}),
        ("hierarchical", {"windows": [1], "strides": [1]}),
        ("longnet", {"segment_lengths": [64], "dilation_rates": [1], "num_heads": 1}),
        ("documents", {"cu_seqlens": [0, 1]}),
    ],
)
def test_sequence_lengths_are_bounded(seq_len: int, name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=rf"seq_len must be in \[1, {MAX_SEQ_LEN}\].*got {seq_len}"):
        patterns.build_pattern(name, seq_len=seq_len, **kwargs)


def test_block_counts_are_bounded() -> None:
    n = (MAX_NUM_BLOCKS + 1) * 16
    with pytest.raises(
        ValueError, match=rf"num_query_blocks must be in \[1, {MAX_NUM_BLOCKS}\], got {MAX_NUM_BLOCKS + 1}"
    ):
        patterns.causal(n, block_size=16)
    with pytest.raises(ValueError, match=rf"num_key_blocks must be in \[1, {MAX_NUM_BLOCKS}\], got {2**31 - 1}"):
        BlockLayout.from_csr(
            torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), block_size=16, num_key_blocks=2**31 - 1
        )
    with pytest.raises(ValueError, match="CSR rows"):
        BlockLayout.from_dense(_dense(), 16).expand_heads(2**30)
    with pytest.raises(ValueError, match="MAX_ROW_INTERVALS"):  # bigbird's draws per row, before any allocation
        patterns.bigbird(2**20, 16, 16, HUGE, block_size=16)
    with pytest.raises(ValueError, match="MAX_ROW_INTERVALS"):  # a lattice of nk/2 columns on 65536 rows
        patterns.hierarchical(2**20, [2**20], [2], block_size=16)
    assert MAX_ROW_INTERVALS >= 2**20  # the check leaves production sizes alone
    with pytest.raises(ValueError, match=r"segment lengths must be <= \d+ tokens, got 4611686018427387904"):
        patterns.longnet(1024, [2**62], [1], num_heads=1, block_size=16)


def test_distances_and_strides_beyond_the_sequence_mean_the_sequence() -> None:
    # window, global tokens and strides of 2**70 used to overflow int64 in the builders
    assert patterns.local_window(1000, 2**70, block_size=16) == patterns.local_window(1000, 1000, block_size=16)
    assert patterns.global_local(1000, 2**70, 2**70, block_size=16) == patterns.global_local(
        1000, 1000, 1000, block_size=16
    )
    assert patterns.dilated(1000, 2**70, block_size=16) == patterns.dilated(1000, 63, block_size=16)
    assert patterns.dilated(1000, 64, block_size=16) == patterns.dilated(1000, 63, block_size=16)
    assert patterns.hierarchical(1000, [2**70], [2**70], block_size=16) == patterns.hierarchical(
        1000, [1000], [63], block_size=16
    )
    assert patterns.bigbird(1000, 2**70, 2**70, 1, block_size=16) == patterns.bigbird(
        1000, 1000, 1000, 1, block_size=16
    )


# ---------------------------------------------------------------- devices
def test_layout_devices_are_validated() -> None:
    lay = patterns.local_window(64, 16, block_size=16)
    with pytest.raises(ValueError, match=r"device must name a torch device.*got 'bogus'"):
        lay.to("bogus")
    with pytest.raises(TypeError, match=r"device must be a torch\.device or a str"):
        lay.to(3)  # type: ignore[arg-type]
    for build in (
        lambda: lay.to("meta"),
        lambda: patterns.causal(64, block_size=16, device="meta"),
        lambda: BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool, device="meta"), 16),
        lambda: BlockLayout.from_csr(
            torch.tensor([0, 1], device="meta"), torch.tensor([0], device="meta"), block_size=16, num_key_blocks=1
        ),
    ):
        with pytest.raises(ValueError, match="meta device"):
            build()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0' is not available: this process sees 0 CUDA"):
            lay.to("cuda:0")
        with pytest.raises(ValueError, match="is not available"):
            patterns.bigbird(64, 16, 16, 1, block_size=16, device="cuda")
    assert lay.to(torch.device("cpu")) is lay and lay.to("cpu") is lay


def test_attention_and_modules_reject_meta_and_wrong_device_inputs() -> None:
    from attn_sparse import (
        AdaptiveBlockSparseAttention,
        BlockSparseAttention,
        MultiheadBlockSparseAttention,
        block_sparse_attention,
        explain,
    )

    lay = patterns.local_window(64, 16, block_size=16)
    q = torch.randn(1, 64, 2, 16)
    m = q.to("meta")
    with pytest.raises(ValueError, match="meta device; block_sparse_attention needs tensors with values"):
        block_sparse_attention(m, m, m, lay)
    with pytest.raises(ValueError, match="meta device"):
        explain(m, m, m, lay)
    with pytest.raises(ValueError, match="meta device"):
        BlockSparseAttention(lay)(m, m, m)
    with pytest.raises(ValueError, match="one device"):
        block_sparse_attention(q, m, q, lay)
    mha = MultiheadBlockSparseAttention(32, 2, layout=lay)
    x = torch.randn(1, 64, 32, device="meta")
    with pytest.raises(ValueError, match="query is on meta, the module's parameters on cpu"):
        mha(x, x, x)
    adaptive = AdaptiveBlockSparseAttention(16, block_size=16).to("meta")
    with pytest.raises(ValueError, match="inputs are on cpu, the scorer's parameters on meta"):
        adaptive(q, q, q)
    with pytest.raises(ValueError, match="inputs are on cpu, the scorer's parameters on meta"):
        adaptive.select(q, q)


def test_triton_reason_on_cpu_names_the_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_sparse.backends import triton as triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lay = patterns.local_window(64, 16, block_size=16)
    q = torch.randn(1, 64, 2, 16, dtype=torch.float64)
    reasons = [r for r in triton_backend.unsupported_reasons(q, q, q, lay, False) if "not installed" not in r]
    assert reasons == ["runs on CUDA devices (or on CPU tensors under TRITON_INTERPRET=1), got device cpu"]


def test_flex_block_mask_lengths_are_bounded() -> None:
    from types import SimpleNamespace

    fake = SimpleNamespace(
        kv_num_blocks=torch.ones(1, 1, 1, dtype=torch.int32),
        kv_indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32),
        BLOCK_SIZE=(128, 128),
        seq_lengths=(2**62, 128),
    )
    with pytest.raises(ValueError, match=rf"BlockMask seq_lengths\[0\] must be in \[1, {MAX_SEQ_LEN}\]"):
        BlockLayout.from_flex_block_mask(fake)
    fake.BLOCK_SIZE = (HUGE, 128)
    with pytest.raises(ValueError, match="block sizes must be powers of two"):
        BlockLayout.from_flex_block_mask(fake)
