"""The umbrella: re-exports, package discovery, and the factories (run with [all] installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attn_core
import dilated_attention_pytorch as dap
from attn_core import reference


def test_reexports_are_the_package_objects() -> None:
    assert dap.dilated_attention is attn_core.dilated_attention
    assert dap.DilatedAttention is attn_core.DilatedAttention
    assert dap.MultiheadDilatedAttention is attn_core.MultiheadDilatedAttention
    assert dap.__version__ == "0.1.0"
    for name in dap.__all__:
        assert hasattr(dap, name), f"__all__ names {name!r} but the module has no such attribute"


def test_all_extras_are_installed_and_reexported() -> None:
    available = dap.available_packages()
    assert available == {"attn_core": True, "attn_sparse": True, "attn_ring": True, "memory_runtime": True}
    import attn_ring
    import attn_sparse

    assert dap.attn_sparse is attn_sparse
    assert dap.attn_ring is attn_ring
    assert dap.BlockLayout is attn_sparse.BlockLayout
    assert dap.ring_attention is attn_ring.ring_attention


def test_resolve_kind_without_distributed_picks_single_device() -> None:
    kind, why = dap.resolve_kind("auto")
    assert kind == "dilated"
    assert "not initialised" in why
    assert dap.resolve_kind("dilated") == ("dilated", "requested explicitly")


@pytest.fixture
def world1(tmp_path: Path) -> Iterator[None]:
    """A real 1-rank gloo process group in this process."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ring_without_distributed_raises_saying_what_to_do() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"kind='ring' is not available: torch.distributed is not initialised"):
        dap.resolve_kind("ring")
    with pytest.raises(ValueError, match="init_process_group"):
        dap.create_dilated_attention([4], [1], kind="ring")
    with pytest.raises(ValueError, match="init_process_group"):
        dap.create_multihead_dilated_attention(16, 2, [4], [1], kind="ring")


def test_ring_in_a_one_rank_world(world1: None) -> None:
    assert dap.resolve_kind("ring") == ("ring", "requested explicitly")
    kind, why = dap.resolve_kind("auto")  # one rank: no ring to spread over
    assert kind == "dilated" and "1 rank" in why
    module = dap.create_dilated_attention([4, 8], [1, 2], kind="ring")
    assert type(module).__name__ == "RingDilatedAttention"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)
    torch.testing.assert_close(module(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("bad", ["Ring", "sparse", ""])
def test_unknown_kind_raises_naming_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        dap.resolve_kind(bad)
    with pytest.raises(ValueError, match=repr(bad)):
        dap.create_dilated_attention([4, 8], [1, 2], kind=bad)


def test_create_dilated_attention_matches_the_reference() -> None:
    module = dap.create_dilated_attention([4, 8], [1, 2])
    assert isinstance(module, attn_core.DilatedAttention)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 13, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = module(q, k, v, is_causal=True)
    expected, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)
    torch.testing.assert_close(out, expected)


def test_create_multihead_dilated_attention_runs_batch_first() -> None:
    layer = dap.create_multihead_dilated_attention(32, 4, [4, 8], [1, 2], dtype=torch.float64)
    assert isinstance(layer, attn_core.MultiheadDilatedAttention)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    out, weights = layer(x, x, x, is_causal=True)
    assert out.shape == (2, 11, 32)
    assert weights is None
    # causal: the first position's output cannot depend on later tokens
    x2 = x.clone()
    x2[:, 5:] += 1.0
    out2, _ = layer(x2, x2, x2, is_causal=True)
    torch.testing.assert_close(out2[:, :5], out[:, :5])
    assert not torch.allclose(out2[:, 5:], out[:, 5:])


def test_options_the_chosen_kind_does_not_take_raise_a_clear_type_error(world1: None) -> None:
    with pytest.raises(TypeError, match=r"DilatedAttention \(kind='dilated'\) does not take \['group'\]"):
        dap.create_dilated_attention([4], [1], kind="dilated", group=None)
    with pytest.raises(TypeError, match=r"RingDilatedAttention \(kind='ring'\) does not take \['dropout'\]"):
        dap.create_dilated_attention([4], [1], kind="ring", dropout=0.1)
    with pytest.raises(TypeError, match=r"kind='ring'\) does not take \['backend'\]"):
        dap.create_multihead_dilated_attention(16, 2, [4], [1], kind="ring", backend="reference")
    ring_layer = dap.create_multihead_dilated_attention(16, 2, [4], [1], kind="ring", timeout_s=5.0)
    assert type(ring_layer).__name__ == "RingMultiheadDilatedAttention"
