"""BlockSparseAttention / MultiheadBlockSparseAttention modules and AdaptiveBlockSparseAttention (learns a planted structure)."""

from __future__ import annotations

import pytest
import torch

from attn_core.reference import block_sparse_attention as reference_bsa
from attn_sparse import (
    AdaptiveBlockSparseAttention,
    BlockSparseAttention,
    MultiheadBlockSparseAttention,
    local_window,
)


def test_block_sparse_attention_module_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    layout = local_window(40, 10, block_size=16)
    mod = BlockSparseAttention(layout)
    ref, _ = reference_bsa(q, k, v, layout.to_dense(), (16, 16), is_causal=True)
    torch.testing.assert_close(mod(q, k, v, is_causal=True), ref)
    other = local_window(40, 30, block_size=16)
    ref2, _ = reference_bsa(q, k, v, other.to_dense(), (16, 16))
    torch.testing.assert_close(mod(q, k, v, layout=other), ref2)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[0, 30:] = True
    ref3, _ = reference_bsa(q, k, v, layout.to_dense(), (16, 16), key_padding_mask=pad)
    torch.testing.assert_close(mod(q, k, v, key_padding_mask=pad), ref3)
    with pytest.raises(ValueError, match="layout=None derives the tiles from the token masks, but none was given"):
        BlockSparseAttention()(q, k, v)
    with pytest.raises(TypeError, match="BlockLayout"):
        BlockSparseAttention("window")  # type: ignore[arg-type]


def test_modules_deep_copy_like_cloned_encoder_layers() -> None:
    import copy

    mha = MultiheadBlockSparseAttention(16, 2, layout=local_window(32, 8, block_size=16))
    mha.attention.layout.transposed_csr()  # a populated cache (holds a lock) must not break copying
    clone = copy.deepcopy(mha)
    assert clone.attention.layout is mha.attention.layout  # layouts are immutable: shared
    assert clone.q_proj.weight is not mha.q_proj.weight
    x = torch.randn(1, 32, 16)
    torch.testing.assert_close(clone(x, x, x)[0], mha(x, x, x)[0])


def test_multihead_module_gqa_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    mha = MultiheadBlockSparseAttention(
        32, 4, num_kv_heads=2, layout=local_window(24, 8, block_size=16), dtype=torch.float64
    )
    x = torch.randn(2, 24, 32, dtype=torch.float64, requires_grad=True)
    out, weights = mha(x, x, x, is_causal=True)
    assert out.shape == (2, 24, 32) and weights is None
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mha.k_proj.weight.grad is not None and mha.k_proj.weight.shape == (16, 32)
    # the core equals the float64 reference on the projected heads
    q = mha.q_proj(x).reshape(2, 24, 4, 8)
    k = mha.k_proj(x).reshape(2, 24, 2, 8)
    v = mha.v_proj(x).reshape(2, 24, 2, 8)
    core, _ = reference_bsa(q, k, v, mha.attention.layout.to_dense(), (16, 16), is_causal=True)
    torch.testing.assert_close(out, mha.out_proj(core.reshape(2, 24, 32)))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadBlockSparseAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadBlockSparseAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="embed_dim=32"):
        mha(x[..., :16], x, x)


def test_adaptive_selection_keeps_diagonal_and_respects_causality() -> None:
    torch.manual_seed(0)
    mod = AdaptiveBlockSparseAttention(8, top_k=2, block_size=16)
    q = torch.randn(2, 70, 4, 8)  # partial last block
    k = torch.randn(2, 70, 2, 8)
    layouts, scores = mod.select(q, k, is_causal=True)
    assert scores.shape == (2, 4, 5, 5) and len(layouts) == 2
    for lay in layouts:
        dense = lay.to_dense()
        assert lay.num_heads == 4
        assert bool(dense.diagonal(dim1=1, dim2=2).all())  # the diagonal block is always kept
        assert not bool(dense.triu(1).any())  # causal: no block after the query block
        assert bool((dense.sum(-1) == torch.clamp(torch.arange(5) + 1, max=3)).all())  # top-2 + diagonal
    layouts, _ = mod.select(q, k)
    assert bool((layouts[0].to_dense().sum(-1) == 3).all())
    with pytest.raises(ValueError, match="square"):
        AdaptiveBlockSparseAttention(8, block_size=(16, 32))
    with pytest.raises(ValueError, match="head_dim"):
        mod(torch.randn(1, 16, 1, 4), torch.randn(1, 16, 1, 4), torch.randn(1, 16, 1, 4))
    with pytest.raises(ValueError, match="must equal that of q"):
        mod(torch.randn(1, 32, 2, 8), torch.randn(1, 48, 2, 8), torch.randn(1, 48, 2, 8))


def test_adaptive_forward_equals_biased_reference() -> None:
    # with the bias, attention = one softmax where tile (i, j)'s keys count w_ij times, w_ij the
    # softmax of the scores over query block i's selected tiles
    torch.manual_seed(1)
    mod = AdaptiveBlockSparseAttention(8, top_k=1, block_size=16).double()
    q = torch.randn(1, 48, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 48, 1, 8, dtype=torch.float64) for _ in range(2))  # GQA
    out = mod(q, k, v, is_causal=True)
    layouts, scores = mod.select(q, k, is_causal=True)
    selected = layouts[0].to_dense()
    tiles = torch.softmax(scores[0].masked_fill(~selected, float("-inf")), dim=-1)  # (H, nb, nb) multiplicities
    weights = tiles.repeat_interleave(16, 1).repeat_interleave(16, 2) * torch.ones(48, 48, dtype=torch.float64).tril()
    from attn_core.reference import attention_from_weights

    ref, _ = attention_from_weights(q, k, v, weights[None])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("is_causal", [False, True])
def test_adaptive_gradients_equal_biased_reference(is_causal: bool) -> None:
    # partial last block, GQA, uneven rows under causal: outputs and the gradients of q, k, v and
    # of the scorer's weights against the dense formulation in float64
    from attn_core.reference import attention_from_weights

    torch.manual_seed(2)
    mod = AdaptiveBlockSparseAttention(8, top_k=2, block_size=16, scorer_dim=8).double()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 70, 4, 8, dtype=torch.float64, generator=g).requires_grad_()
    k, v = (torch.randn(2, 70, 2, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    dout = torch.randn(2, 70, 4, 8, dtype=torch.float64, generator=g)
    params = (mod.q_score.weight, mod.k_score.weight)
    got = (mod(q, k, v, is_causal=is_causal),)
    got_grads = torch.autograd.grad(got[0], (q, k, v, *params), dout)

    layouts, scores = mod.select(q, k, is_causal=is_causal)
    selected = torch.stack([lay.to_dense() for lay in layouts])  # (B, H, nb, nb)
    tiles = torch.softmax(scores.masked_fill(~selected, float("-inf")), dim=-1)
    weights = tiles.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :70, :70]
    if is_causal:
        weights = weights * torch.ones(70, 70, dtype=torch.float64).tril()
    want, _ = attention_from_weights(q, k, v, weights)
    want_grads = torch.autograd.grad(want, (q, k, v, *params), dout)
    torch.testing.assert_close(got[0], want)
    for name, a, b in zip(("dq", "dk", "dv", "dWq", "dWk"), got_grads, want_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, msg=name)


def test_adaptive_compiles_whole() -> None:
    # fixed-width tiles: every shape follows from the input shapes, so no graph break
    torch._dynamo.reset()
    torch.manual_seed(4)
    mod = AdaptiveBlockSparseAttention(8, top_k=2, block_size=16)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 56, 2, 8, generator=g).requires_grad_()
    k, v = (torch.randn(1, 56, 1, 8, generator=g).requires_grad_() for _ in range(2))
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)  # a graph break raises
    got = compiled(q, k, v, is_causal=True)
    want = mod(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want)
    dout = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b)


def _planted_batch(E: torch.Tensor, F: torch.Tensor, perm: torch.Tensor, B: int, nb: int, bs: int, g: torch.Generator):
    """Blocks carry random class labels; query block i must read the key block of class perm[class_i]."""
    C, D = E.shape
    N = nb * bs
    c = torch.stack([torch.randperm(C, generator=g)[:nb] for _ in range(B)])
    q = E[c].repeat_interleave(bs, 1)[:, :, None] + 0.5 * torch.randn(B, N, 1, D, generator=g)
    k = F[c].repeat_interleave(bs, 1)[:, :, None] + 0.5 * torch.randn(B, N, 1, D, generator=g)
    v = torch.randn(B, N, 1, D, generator=g)
    target_block = torch.gather(torch.argsort(c, dim=1), 1, perm[c])  # (B, nb)
    masks = torch.eye(nb, dtype=torch.bool).repeat(B, 1, 1)
    masks[torch.arange(B)[:, None], torch.arange(nb)[None], target_block] = True
    target = torch.cat(
        [
            reference_bsa(q[b : b + 1], k[b : b + 1], v[b : b + 1], masks[b : b + 1], (bs, bs), dtype=torch.float32)[0]
            for b in range(B)
        ]
    )
    return q, k, v, target, target_block


@pytest.fixture
def one_thread():
    # hundreds of tiny ops: intra-op threads only add overhead (and thrash on a busy 2-core CI box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_adaptive_learns_a_planted_block_structure() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    nb, bs, D = 6, 16, 16
    E, F, perm = torch.randn(nb, D, generator=g), torch.randn(nb, D, generator=g), torch.randperm(nb, generator=g)
    mod = AdaptiveBlockSparseAttention(D, top_k=2, block_size=bs, scorer_dim=16)
    opt = torch.optim.Adam(mod.parameters(), lr=0.05)

    def accuracy() -> float:
        q, k, _, _, target_block = _planted_batch(E, F, perm, 32, nb, bs, g)
        with torch.no_grad():
            s = mod.block_scores(q, k)[:, 0].masked_fill(torch.eye(nb, dtype=torch.bool), float("-inf"))
        off_diagonal = target_block != torch.arange(nb)
        return float((s.argmax(-1) == target_block)[off_diagonal].float().mean())

    before = accuracy()
    losses = []
    for _ in range(150):
        q, k, v, target, _ = _planted_batch(E, F, perm, 8, nb, bs, g)
        loss = ((mod(q, k, v) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = accuracy()
    assert before < 0.5  # chance is 1 / (nb - 1)
    assert after >= 0.75, (before, after)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])


def test_module_arguments_are_validated_early() -> None:
    from attn_sparse import BlockSparseAttention, MultiheadBlockSparseAttention
    from attn_sparse import patterns as P

    with pytest.raises(ValueError, match="backend must be one of"):
        BlockSparseAttention(backend="trtion")
    with pytest.raises(ValueError, match="softmax_scale"):
        BlockSparseAttention(softmax_scale=-1.0)
    m = MultiheadBlockSparseAttention(16, 2, layout=P.causal(32, block_size=16))
    with pytest.raises(ValueError, match="one batch size"):
        m(torch.randn(2, 32, 16), torch.randn(3, 32, 16), torch.randn(3, 32, 16))
    with pytest.raises(TypeError, match="differs from the module's parameters"):
        m(*(torch.randn(2, 32, 16, dtype=torch.float64),) * 3)


def test_adaptive_on_empty_inputs_returns_empty_outputs() -> None:
    from attn_sparse import AdaptiveBlockSparseAttention

    m = AdaptiveBlockSparseAttention(16, top_k=2, block_size=16)
    for shape in ((1, 0, 2, 16), (0, 32, 2, 16)):
        x = torch.randn(*shape)
        assert m(x, x, x).shape == shape
