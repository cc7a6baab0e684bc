"""attn_sparse.blocks: attention of a query shard over one key range (out, lse) and its backward
from the merged statistics, against the float64 reference (attn_core.reference), both backends.

The query shard is rows [q0, N) of a random block-sparse attention over N tokens, split into two
key ranges as ring attention splits them: keys [0, q0) (all before the shard: not causal) and
keys [q0, N) (aligned with the shard: causal when the attention is). The two ranges' outputs
merged by LSE must equal the full attention's rows, and the ranges' backward contributions,
each from the merged out and LSE, must add up to the full attention's gradients.
"""

from __future__ import annotations

import importlib.util
import os

# Kernels are decorated at import: the interpreter must be selected before attn_sparse.kernels loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from attn_core import reference
from attn_core.merge import merge_into_
from attn_core.testing import assert_close_to_reference
from attn_sparse import BLOCK_BACKENDS, BlockLayout, block_backend, block_backward, block_forward

BS = 16


def triton_runs_here() -> bool:
    """The kernels run on CPU tensors: triton is installed and its interpreter selected."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


def random_mask(heads: int, nb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(heads, nb, nb, generator=g) < density
    mask[:, nb - 2] = False  # a query block of the shard that sees no key: out 0, lse -inf, zero gradients
    return mask


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool, dout: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(out, lse, dq, dk, dv) of the full attention in q's dtype (the float64 reference, or the plain
    torch baseline of a lower precision)."""
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = reference.block_sparse_attention(qr, kr, vr, mask, (BS, BS), is_causal=causal, dtype=q.dtype)
    grads = torch.autograd.grad(out, (qr, kr, vr), dout.to(q.dtype))
    return (out.detach(), lse.detach(), *grads)


def shard_by_ranges(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    causal: bool,
    dout: torch.Tensor,
    q0: int,
    backend: str,
) -> tuple[torch.Tensor, ...]:
    """(out, lse, dq, dk, dv) of query rows [q0, N) through block_forward / block_backward over the
    key ranges [0, q0) and [q0, N); dk, dv over all N keys (0 for keys no shard row attends)."""
    qs, dos = q[:, q0:], dout[:, q0:]
    qb0, kb0 = q0 // BS, q0 // BS
    ranges = [
        (k[:, :q0], v[:, :q0], BlockLayout.from_dense(mask[:, qb0:, :kb0], block_size=BS), False),
        (k[:, q0:], v[:, q0:], BlockLayout.from_dense(mask[:, qb0:, kb0:], block_size=BS), causal),
    ]
    B, n, H, D = qs.shape
    out = torch.zeros(B, n, H, D, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    lse = torch.full((B, H, n), float("-inf"), dtype=out.dtype)
    for kr, vr, layout, c in ranges:
        o, l = block_forward(qs, kr, vr, layout, is_causal=c, backend=backend)
        assert o.dtype == q.dtype and l.shape == (B, H, n) and not o.requires_grad
        merge_into_(out, lse, o, l)
    dq = torch.zeros_like(out)
    dks, dvs = [], []
    for kr, vr, layout, c in ranges:
        gq, gk, gv = block_backward(dos, qs, kr, vr, out, lse, layout, is_causal=c, backend=backend)
        assert gq.dtype == out.dtype and gk.shape == kr.shape and gv.shape == vr.shape
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    return out, lse, dq, torch.cat(dks, 1), torch.cat(dvs, 1)


CASES = [
    # (N, q0, H, Hkv, layout heads, causal): N not a multiple of the block (partial last blocks)
    (88, 32, 2, 1, 1, False),
    (88, 48, 4, 2, 4, True),
    (96, 32, 2, 2, 2, True),
]


def run_case(
    N: int, q0: int, H: int, Hkv: int, heads: int, causal: bool, dtype: torch.dtype, backend: str, seed: int
) -> None:
    B, D = (2 if dtype == torch.float64 else 1), 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dout[:, :q0] = 0  # the full attention's gradients then come from the shard's rows only
    mask = random_mask(heads, -(-N // BS), 0.5, seed + 1)

    def shard_rows(full: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out, lse, dq, dk, dv = full
        return out[:, q0:], lse[..., q0:], dq[:, q0:], dk, dv

    want = shard_rows(full_attention(q, k, v, mask, causal, dout))
    low = (q.to(dtype), k.to(dtype), v.to(dtype))
    baseline = None if dtype == torch.float64 else shard_rows(full_attention(*low, mask, causal, dout))
    got = shard_by_ranges(*low, mask, causal, dout.to(dtype), q0, backend)
    empty = slice((-(-N // BS) - 2) * BS - q0, (-(-N // BS) - 1) * BS - q0)
    assert torch.all(got[0][:, empty] == 0) and torch.all(got[1][..., empty] == float("-inf"))
    assert torch.all(got[2][:, empty] == 0)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        base = None if baseline is None else baseline[i]
        assert_close_to_reference(f"{backend} {dtype} {name}", got[i], want[i], base)


@pytest.mark.parametrize(("N", "q0", "H", "Hkv", "heads", "causal"), CASES)
def test_reference_backend_float64(N, q0, H, Hkv, heads, causal) -> None:
    run_case(N, q0, H, Hkv, heads, causal, torch.float64, "reference", seed=N + q0 + heads)


@pytest.mark.skipif(not triton_runs_here(), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("N", "q0", "H", "Hkv", "heads", "causal"), CASES[1:])
def test_triton_backend_interpreted(N, q0, H, Hkv, heads, causal, dtype) -> None:
    run_case(N, q0, H, Hkv, heads, causal, dtype, "triton", seed=7 * N + q0 + heads)


def test_backend_choice_is_explained_and_pins_never_fall_back() -> None:
    assert BLOCK_BACKENDS == ("triton", "reference")
    layout = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), block_size=BS)
    q64 = torch.randn(1, 32, 2, 16, dtype=torch.float64)
    choice = block_backend(q64, layout)
    assert choice.backend == "reference"
    assert choice.rejected["triton"], choice  # the reason is stated (dtype, device or triton missing)
    assert any(r in str(choice) for r in ("float64", "CUDA", "not installed")), str(choice)
    with pytest.raises(ValueError, match="backend 'triton' cannot take this input"):
        block_backend(q64, layout, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' cannot take this input"):
        block_forward(q64, q64[:, :, :1], q64[:, :, :1], layout, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'flex'"):
        block_forward(q64, q64, q64, layout, backend="flex")
    assert block_backend(q64, layout, backend="reference").why == "pinned by backend='reference'"
    if triton_runs_here():
        assert block_backend(q64.float(), layout).backend == "triton"


def test_empty_batch_gives_empty_results() -> None:
    layout = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), block_size=BS)
    q, k = torch.randn(0, 32, 2, 16), torch.randn(0, 32, 1, 16)
    for backend in BLOCK_BACKENDS if triton_runs_here() else ("reference",):
        out, lse = block_forward(q, k, k, layout, backend=backend)
        assert out.shape == q.shape and lse.shape == (0, 2, 32)
        grads = block_backward(out, q, k, k, out, lse, layout, backend=backend)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]


def test_bad_input_raises_naming_it() -> None:
    layout = BlockLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), block_size=BS)
    q = torch.randn(1, 32, 2, 16, dtype=torch.float64)
    out, lse = block_forward(q, q, q, layout)
    with pytest.raises(TypeError, match="BlockLayout"):
        block_forward(q, q, q, torch.ones(1, 2, 2, dtype=torch.bool))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks"):
        block_forward(
            q, torch.randn(1, 48, 2, 16, dtype=torch.float64), torch.randn(1, 48, 2, 16, dtype=torch.float64), layout
        )  # 3 key blocks needed, the layout has 2
    with pytest.raises(ValueError, match="4 dims"):
        block_forward(q[0], q, q, layout)
    with pytest.raises((TypeError, ValueError), match="is_causal"):
        block_forward(q, q, q, layout, is_causal=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 32\)"):
        block_backward(out, q, q, q, out, lse[..., :16], layout)
    with pytest.raises(ValueError, match="dout must have shape"):
        block_backward(out[:, :16], q, q, q, out, lse, layout)
    with pytest.raises(TypeError, match="out must be a floating tensor"):
        block_backward(out, q, q, q, out.long(), lse, layout)
