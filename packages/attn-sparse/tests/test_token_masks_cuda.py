"""Token masks on the compiled Triton kernels (CUDA, bf16/fp16): layout=None and a given layout.

The CPU suite (test_token_masks.py) runs the same kernels in Triton's interpreter; this file checks
what only a GPU build shows: the compiled tile splits, both backward forms (recompute for masked
calls, stored dS otherwise), head dims 64 and 128, GQA groups 4 and 8, at lengths of several tiles. Every out, dq,
dk and dv is compared to the float64 reference under the project's 2x-of-plain-PyTorch rule
(attn_core.testing), and rows that see no key must be exactly 0.
"""

from __future__ import annotations

import pytest
import torch

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_core.triton_env import interpret_mode, triton_installed
from attn_sparse import BlockLayout, block_sparse_attention, last_backend
from attn_sparse.api import DERIVED_BLOCK_SIZE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and triton_installed() and not interpret_mode()),
        reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset or 0)",
    ),
]


def _on_cuda(masks: dict) -> dict:
    """The masks with cu_seqlens (a tuple in CASES, so collecting needs no GPU) as int32 on CUDA."""
    docs = masks.get("cu_seqlens")
    return masks if docs is None else {**masks, "cu_seqlens": torch.tensor(docs, dtype=torch.int32, device="cuda")}


# (N, H, Hkv, D, masks, dtype, given layout density or None for layout=None)
CASES = [
    (1000, 8, 2, 128, {"is_causal": True}, torch.bfloat16, None),
    (1000, 8, 1, 64, {"is_causal": True, "window_size": (300, 0)}, torch.bfloat16, None),
    (777, 4, 4, 64, {"window_size": (90, 40)}, torch.float16, None),
    (1100, 8, 2, 128, {"is_causal": True, "window_size": (60, 0)}, torch.float16, None),
    (1024, 4, 1, 128, {"is_causal": True, "cu_seqlens": (0, 1, 1, 300, 301, 900, 1024)}, torch.bfloat16, None),
    (900, 8, 2, 64, {"window_size": (200, 200), "cu_seqlens": (0, 450, 451, 900)}, torch.bfloat16, 0.6),
    (640, 4, 2, 128, {"is_causal": True}, torch.bfloat16, 0.5),
    (640, 8, 2, 64, {}, torch.bfloat16, 0.5),  # no token mask: the stored-dS backward
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c) if not isinstance(c, tuple) else None)
def test_compiled_kernels_match_float64_reference(case) -> None:
    n, h, hkv, d, masks, dtype, density = case
    masks = _on_cuda(masks)
    g = torch.Generator(device="cuda").manual_seed(n + h + d)
    q = torch.randn(1, n, h, d, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, n, hkv, d, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, n, hkv, d, device="cuda", generator=g).to(dtype).requires_grad_()
    do = torch.randn(1, n, h, d, device="cuda", generator=g).to(dtype)
    block = DERIVED_BLOCK_SIZE
    nb = (-(-n // block[0]), -(-n // block[1]))
    if density is None:
        layout = None
        tiles = torch.ones(1, *nb, dtype=torch.bool)
    else:
        tiles = torch.rand(h, *nb, generator=torch.Generator().manual_seed(n)) < density
        tiles[:, torch.arange(nb[0]), torch.arange(nb[0])] = True
        layout = BlockLayout.from_dense(tiles, block)
    out = block_sparse_attention(q, k, v, layout, backend="triton", **masks)
    assert last_backend() == "triton"
    grads = torch.autograd.grad(out, (q, k, v), do)

    def ref(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, _ = reference.block_sparse_attention(qr, kr, vr, tiles, block, dtype=dt, **masks)
        return (o, *torch.autograd.grad(o, (qr, kr, vr), do.to(dt)))

    want, base = ref(torch.float64), ref(dtype)
    for name, got, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), want, base):
        assert not bool(torch.isnan(got).any()), name
        assert_close_to_reference(name, got, r, b)
    seen = reference.block_sparse_weights(tiles, block, n, n).cuda() & reference.document_mask(
        n, n, device="cuda", **masks
    )
    empty_rows = ~seen.expand(h, -1, -1).any(-1)  # (H, N)
    assert bool((out.transpose(1, 2)[0][empty_rows] == 0).all())


def test_device_without_index_accepts_offsets_on_that_device() -> None:
    """torch.device("cuda") names the current device; offsets on cuda:0 must be taken, not refused."""
    from attn_sparse.masks import TokenMask

    cu = torch.tensor([0, 5, 64], dtype=torch.int32, device="cuda")
    mask = TokenMask.build(
        is_causal=True, cu_seqlens=cu, batch=1, seq_len_q=64, seq_len_k=64, device=torch.device("cuda")
    )
    dense = mask.dense(64, 64, torch.device("cuda"))
    assert not dense[10, 4] and dense[10, 5] and not dense[3, 4]


def test_offsets_read_once_across_dilated_and_block_sparse():
    """A cu_seqlens tensor a packed dilated call has read is validated for a block-sparse call from
    the same host copy: building the block-sparse token masks waits for the GPU nowhere."""
    from attn_core import dilated_attention
    from attn_sparse.masks import TokenMask

    cu = torch.tensor([0, 300, 301, 430, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
    dilated_attention(q, q, q, [64, 128], [1, 2], cu_seqlens=cu, backend="sdpa")  # reads cu once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = TokenMask.build(cu_seqlens=cu, batch=1, seq_len_q=1000, seq_len_k=1000, device=q.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mask.host_cu_seqlens.tolist() == [0, 300, 301, 430, 1000]
    assert mask.cu_seqlens is cu
