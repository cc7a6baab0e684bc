"""AdaptiveBlockSparseAttention: a learned block scorer picks the key blocks each query block reads.

Per (batch, head): queries and keys are mean-pooled over each block of ``block_size`` tokens;
two small linear maps project the pooled vectors to ``scorer_dim`` and their scaled dot products
give a score s[i, j] for every (query block i, key block j). Each query block keeps its
``top_k`` best key blocks plus, always, its diagonal block (with ``is_causal``, only blocks
j <= i are eligible).

How gradients reach the scorer: top-k selection is not differentiable, so the *selected* tiles
of query block i get weights w[i, j] = softmax of s[i, j] over those tiles, and every logit of
tile (i, j) gets the bias ``log w[i, j]`` before the attention softmax: the keys of tile j count
w[i, j] times. The loss thus moves the scores of the selected tiles against each other (useful
tiles up, useless ones down, without the saturation a per-tile sigmoid gate shows once a score is
large), and a block that falls out of the top-k is replaced by the next best. The biased
attention runs on the gathered-tiles PyTorch path of the reference backend (the fused kernels
take no per-tile bias), with one layout per batch element.
"""

from __future__ import annotations

import torch
from torch import nn

from attn_core.validation import check_bool, check_qkv, resolve_softmax_scale

from .backends.reference import gathered_attention
from .layout import BlockLayout, check_block_size

__all__ = ["AdaptiveBlockSparseAttention"]


def _pool(t: torch.Tensor, block: int) -> torch.Tensor:
    """(B, N, h, D) -> (B, h, ceil(N / block), D) mean over each block's real tokens."""
    B, N, h, D = t.shape
    nb = -(-N // block)
    padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, nb * block - N)).reshape(B, nb, block, h, D).sum(dim=2)
    count = torch.full((nb,), float(block), dtype=t.dtype, device=t.device)
    count[-1] = N - (nb - 1) * block
    return (padded / count[None, :, None, None]).transpose(1, 2)


class AdaptiveBlockSparseAttention(nn.Module):
    """Self-attention over learned top-k key blocks per query block (see the module docstring).

    forward(q (B, N, H, D), k, v (B, N, Hkv, D), *, is_causal=False) -> (B, N, H, D).
    :meth:`select` returns the layouts and scores without computing attention.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        top_k: int = 4,
        block_size: int = 64,
        scorer_dim: int = 32,
        softmax_scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("head_dim", head_dim), ("top_k", top_k), ("scorer_dim", scorer_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        bq, bk = check_block_size(block_size)
        if bq != bk:
            raise ValueError(f"block_size must be square (the diagonal block is always kept), got {block_size!r}")
        self.head_dim, self.top_k, self.block = head_dim, top_k, bq
        self.softmax_scale = resolve_softmax_scale(softmax_scale, head_dim)
        self.q_score = nn.Linear(head_dim, scorer_dim, bias=False)
        self.k_score = nn.Linear(head_dim, scorer_dim, bias=False)

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scores (B, H, nb, nb) of every (query block, key block) pair."""
        H, Hkv = q.shape[2], k.shape[2]
        dt = self.q_score.weight.dtype
        pq = self.q_score(_pool(q, self.block).to(dt))  # (B, H, nb, S)
        pk = self.k_score(_pool(k, self.block).to(dt)).repeat_interleave(H // Hkv, dim=1)
        return torch.matmul(pq, pk.transpose(-1, -2)) * pq.shape[-1] ** -0.5

    def select(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool = False
    ) -> tuple[list[BlockLayout], torch.Tensor]:
        """Per batch element a per-head layout of the chosen tiles, and the scores (B, H, nb, nb)."""
        scores = self.block_scores(q, k)
        B, H, nb, _ = scores.shape
        eye = torch.eye(nb, dtype=torch.bool, device=q.device)
        pick = scores.detach().masked_fill(eye, float("inf"))  # the diagonal is always taken
        if is_causal:
            pick = pick.masked_fill(torch.ones_like(eye).triu(1), float("-inf"))
        kk = min(self.top_k + 1, nb)
        top = pick.topk(kk, dim=-1)
        ok = top.values > float("-inf")  # causal rows near the start have fewer eligible blocks
        lo = torch.where(ok, top.indices, torch.zeros_like(top.indices))
        hi = torch.where(ok, top.indices + 1, torch.zeros_like(top.indices))
        layouts = [
            BlockLayout._from_intervals(
                lo[b].reshape(H * nb, kk),
                hi[b].reshape(H * nb, kk),
                block_size=(self.block, self.block),
                num_heads=H,
                num_query_blocks=nb,
                num_key_blocks=nb,
            )
            for b in range(B)
        ]
        return layouts, scores

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
        D = check_qkv(q, k, v)[4]
        if self.head_dim != D:
            raise ValueError(f"head dim of q/k/v ({D}) must equal the module's head_dim={self.head_dim}")
        causal = check_bool("is_causal", is_causal)
        if q.shape[0] == 0 or q.shape[1] == 0:  # no rows: empty output, still connected to the graph
            return q * 0 + (k.sum() + v.sum()).to(q.dtype) * 0
        layouts, scores = self.select(q, k, is_causal=causal)
        outs = []
        nb = scores.shape[-1]
        for b, layout in enumerate(layouts):
            # log of each selected tile's weight: a softmax of the scores over the row's selected tiles
            log_w = torch.log_softmax(scores[b].masked_fill(~layout.to_dense(), float("-inf")), dim=-1)
            bias = log_w.reshape(-1, nb)[layout.tile_rows(), layout.col_indices.long()]  # CSR order
            out, _ = gathered_attention(
                q[b : b + 1],
                k[b : b + 1],
                v[b : b + 1],
                layout,
                is_causal=causal,
                softmax_scale=self.softmax_scale,
                tile_bias=bias[None],
            )
            outs.append(out)
        return torch.cat(outs, dim=0)
