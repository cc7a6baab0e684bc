"""Every ring's autograd Function refuses double backward with a clear error, and first-order gradients still flow."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attn_ring import ring_attention, ring_dilated_attention


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sparse = pytest.importorskip("attn_sparse")
    from attn_ring.ring_sparse import ring_block_sparse_attention

    layout = sparse.BlockLayout.from_dense(torch.ones(1, 1, 1, dtype=torch.bool), 16)
    return ring_block_sparse_attention(q, k, v, layout, is_causal=True)


RINGS: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "ring": ("ring attention", lambda q, k, v: ring_attention(q, k, v, is_causal=True)),
    "dilated": ("ring dilated attention", lambda q, k, v: ring_dilated_attention(q, k, v, [8, 16], [1, 2])),
    "sparse": ("ring block-sparse attention", _sparse),
}


@pytest.mark.parametrize("name", sorted(RINGS))
def test_double_backward_raises_a_clear_error(world_of_one: None, name: str) -> None:
    what, run = RINGS[name]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, 2, 16, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    out = run(q, k, v)
    # first order, with a graph: the gradients equal the plain first-order ones
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(run(q, k, v).square().sum(), (q, k, v))
    for a, b in zip((dq, dk, dv), plain):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=rf"double backward .*not supported by {what}"):
        torch.autograd.grad(dq.sum(), q)
