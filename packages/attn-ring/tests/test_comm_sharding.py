"""Single-process tests of the ring communication layer and the sharding helpers.

Multi-rank behaviour (real processes, W = 1..4) is in integration_tests/test_ring.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_ring import RingComm, shard_positions, shard_sequence, unshard_sequence
from attn_ring.comm import check_timeout, config_hash, dtype_code
from attn_ring.sharding import check_shard_len, check_sharding


@pytest.fixture
def world1(tmp_path: Path) -> Iterator[None]:
    """A real 1-rank gloo process group in this process."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_round_trip_and_positions(layout: str, world: int) -> None:
    N = 2 * world * 3
    x = torch.randn(2, N, 3, 4)
    shards = [shard_sequence(x, world, r, layout=layout) for r in range(world)]
    assert all(s.shape == (2, N // world, 3, 4) for s in shards)
    torch.testing.assert_close(unshard_sequence(shards, layout=layout), x, rtol=0, atol=0)
    pos = torch.cat([shard_positions(N, world, r, layout) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(N))  # a partition of the sequence
    for r in range(world):
        torch.testing.assert_close(shards[r], x[:, shard_positions(N, world, r, layout)], rtol=0, atol=0)


def test_zigzag_pairs_early_and_late_chunks() -> None:
    # W=2, N=8: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert shard_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]


def test_other_dim_and_odd_contiguous_shards() -> None:
    x = torch.randn(3, 15)
    s = [shard_sequence(x, 3, r, dim=-1) for r in range(3)]
    assert s[0].shape == (3, 5)  # odd shard length is fine for contiguous
    torch.testing.assert_close(unshard_sequence(s, dim=-1), x)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: shard_sequence(torch.zeros(1, 10), 3, 0), r"N=10 .*W=3.*N % W == 0"),
        (lambda: shard_sequence(torch.zeros(1, 10), 2, 0, layout="zigzag"), r"N=10 .*W=2.*N % \(2 \* W\)"),
        (lambda: shard_sequence(torch.zeros(1, 8), 2, 2), r"rank must be an int in \[0, 2\)"),
        (lambda: shard_sequence(torch.zeros(1, 8), 0, 0), r"world_size must be a positive int"),
        (lambda: shard_sequence(torch.zeros(1, 8), 2, 0, layout="ring"), r"layout must be one of"),
        (lambda: shard_sequence(torch.zeros(1, 8), 2, 0, dim=2), r"dim must be an int"),
        (lambda: unshard_sequence([]), r"non-empty sequence"),
        (lambda: unshard_sequence([torch.zeros(1, 4), torch.zeros(1, 5)]), r"shard 1 is"),
        (lambda: unshard_sequence([torch.zeros(1, 3)], layout="zigzag"), r"n=3 .*positive even"),
        (lambda: check_sharding(0, 1, "contiguous"), r"N=0"),
        (lambda: check_shard_len(0, "contiguous"), r"n=0"),
        (lambda: check_timeout(0), r"timeout_s must be a positive"),
        (lambda: check_timeout(True), r"timeout_s must be a positive"),
    ],
)
def test_bad_inputs_raise_value_error(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_shard_type_error() -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        shard_sequence([1, 2], 1, 0)  # type: ignore[arg-type]


def test_descriptor_helpers_are_stable() -> None:
    assert dtype_code(torch.bfloat16) != dtype_code(torch.float16) != 0
    assert dtype_code(torch.int32) == 0
    assert config_hash(("zigzag", 1.0)) == config_hash(("zigzag", 1.0)) != config_hash(("contiguous", 1.0))


def test_ring_comm_needs_initialised_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="not initialised"):
        RingComm()


def test_ring_comm_world_of_one(world1: None) -> None:
    class Counting:
        def __init__(self) -> None:
            self.acquired = 0
            self.released = 0

        def acquire(self, shape: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
            self.acquired += 1
            return torch.empty(tuple(shape), dtype=dtype, device=device)

        def release(self, tensor: torch.Tensor) -> None:
            self.released += 1

    prov = Counting()
    with RingComm(timeout_s=10, buffers=prov) as comm:
        assert (comm.rank, comm.world_size, comm.next_rank, comm.prev_rank) == (0, 1, 0, 0)
        assert comm.device == torch.device("cpu")
        comm.handshake({"batch": 2, "dtype": dtype_code(torch.float32)})
        t = torch.randn(3, 4)
        got = comm.send_recv([t]).wait()
        assert got[0] is t  # a ring of one: the block comes straight back
    assert prov.acquired == prov.released == 0


def test_ring_comm_bad_arguments(world1: None) -> None:
    with pytest.raises(TypeError, match="buffers must provide acquire"):
        RingComm(buffers=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        RingComm(timeout_s=-1)
    with pytest.raises(TypeError, match="group must be"):
        RingComm(group="world")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(1, 6),
    chunk=st.integers(1, 5),
    layout=st.sampled_from(["contiguous", "zigzag"]),
    extra=st.integers(0, 3),
)
def test_sharding_properties(world: int, chunk: int, layout: str, extra: int) -> None:
    """Valid N round-trips exactly; N off the layout's rule raises ValueError naming N and W."""
    parts = world if layout == "contiguous" else 2 * world
    N = parts * chunk
    x = torch.arange(2 * N).reshape(2, N)
    shards = [shard_sequence(x, world, r, layout=layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    bad = N + extra
    if bad % parts:
        with pytest.raises(ValueError, match=f"N={bad} .*W={world}"):
            shard_sequence(torch.zeros(1, bad), world, 0, layout=layout)
