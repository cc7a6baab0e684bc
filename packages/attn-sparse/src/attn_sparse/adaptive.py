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
attention runs in PyTorch (the fused kernels take no per-tile bias) over the chosen tiles
gathered at a fixed width, top_k + 1 tiles per query block, so every shape is known from the
input shapes and the module compiles whole under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from attn_core.blocks import acc_dtype, softmax_with_lse
from attn_core.validation import check_bool, check_qkv, resolve_softmax_scale

from .layout import BlockLayout, check_block_size

__all__ = ["AdaptiveBlockSparseAttention"]


def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """(B, N, h, D) -> (B, h, ceil(N / block), block, D), zero-padded past N."""
    B, N, h, D = t.shape
    nb = -(-N // block)
    padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, nb * block - N))
    return padded.reshape(B, nb, block, h, D).permute(0, 3, 1, 2, 4)


def _pool(t: torch.Tensor, block: int) -> torch.Tensor:
    """(B, N, h, D) -> (B, h, ceil(N / block), D) mean over each block's real tokens, in
    acc_dtype (float32, float64 for float64 t): a float16 sum of a block overflows at 65504."""
    N = t.shape[1]
    nb = -(-N // block)
    ad = acc_dtype(t.dtype)
    count = torch.full((nb,), float(block), dtype=ad, device=t.device)
    count[-1] = N - (nb - 1) * block
    return _blocks(t, block).sum(dim=3, dtype=ad) / count[:, None]


def _tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: torch.Tensor,
    valid: torch.Tensor,
    log_w: torch.Tensor,
    block: int,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention of each query block over its chosen key blocks, tile t's logits biased by log_w[t].

    q: (B, N, H, D); k, v: (B, N, Hkv, D); tiles, valid, log_w: (B, H, nb, T), the key block of
    each of a query block's T slots, whether the slot holds a tile, its bias. -> (B, N, H, D).
    """
    B, N, H, D = q.shape
    group = H // k.shape[2]
    nb, T = tiles.shape[2], tiles.shape[3]
    ad = acc_dtype(q.dtype)
    qb = _blocks(q, block).to(ad)  # (B, H, nb, bq, D)
    # each query head's kv head, gathered per slot: (B, H, nb, T * bk, D)
    b_i = torch.arange(B, device=q.device)[:, None, None, None]
    kvh = (torch.arange(H, device=q.device) // group)[None, :, None, None]
    kt = _blocks(k, block).to(ad)[b_i, kvh, tiles].reshape(B, H, nb, T * block, D)
    vt = _blocks(v, block).to(ad)[b_i, kvh, tiles].reshape(B, H, nb, T * block, D)
    s = torch.matmul(qb, kt.transpose(-1, -2)) * scale  # (B, H, nb, bq, T * bk)
    s = s + log_w.to(ad).repeat_interleave(block, dim=-1)[:, :, :, None, :]
    # masked keys: empty slots, keys past N and (causal) keys after the query
    kpos = (tiles[..., None] * block + torch.arange(block, device=q.device)).reshape(B, H, nb, 1, T * block)
    masked = ~valid.repeat_interleave(block, dim=-1)[:, :, :, None, :] | (kpos >= N)
    if is_causal:
        qpos = torch.arange(nb * block, device=q.device).reshape(nb, block, 1)
        masked = masked | (kpos > qpos)
    s = s.masked_fill(masked, float("-inf"))
    # every row keeps its diagonal tile, but a row of only masked keys must give 0, not NaN
    p, _ = softmax_with_lse(s)
    out = torch.matmul(p, vt)  # (B, H, nb, bq, D)
    return out.permute(0, 2, 3, 1, 4).reshape(B, nb * block, H, D)[:, :N].to(q.dtype)


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

    def _check_device(self, *tensors: torch.Tensor) -> None:
        weight = self.q_score.weight
        for t in tensors:
            if t.device != weight.device:
                raise ValueError(
                    f"inputs are on {t.device}, the scorer's parameters on {weight.device}: move one of them"
                )

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scores (B, H, nb, nb) of every (query block, key block) pair, in float32 (float64 when
        the scorer's weights are float64): with float16/bfloat16 weights the projections and
        their dot products still run in float32, so inputs of magnitude 1e3 give finite scores."""
        self._check_device(q, k)
        H, Hkv = q.shape[2], k.shape[2]
        ad = acc_dtype(self.q_score.weight.dtype)
        wq, wk = self.q_score.weight.to(ad), self.k_score.weight.to(ad)  # differentiable casts
        pq = torch.nn.functional.linear(_pool(q, self.block).to(ad), wq)  # (B, H, nb, S)
        pk = torch.nn.functional.linear(_pool(k, self.block).to(ad), wk).repeat_interleave(H // Hkv, dim=1)
        return torch.matmul(pq, pk.transpose(-1, -2)) * pq.shape[-1] ** -0.5

    def _choose(self, scores: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles, valid), each (B, H, nb, min(top_k + 1, nb)): the diagonal block and the top_k best
        others of each query block; with is_causal, rows near the start have fewer eligible blocks
        (their extra slots are not valid)."""
        nb = scores.shape[-1]
        eye = torch.eye(nb, dtype=torch.bool, device=scores.device)
        pick = scores.detach().masked_fill(eye, float("inf"))  # the diagonal is always taken
        if is_causal:
            pick = pick.masked_fill(torch.ones_like(eye).triu(1), float("-inf"))
        top = pick.topk(min(self.top_k + 1, nb), dim=-1)
        return top.indices, top.values > float("-inf")

    def select(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool = False
    ) -> tuple[list[BlockLayout], torch.Tensor]:
        """Per batch element a per-head layout of the chosen tiles, and the scores (B, H, nb, nb)."""
        scores = self.block_scores(q, k)
        B, H, nb, _ = scores.shape
        tiles, ok = self._choose(scores, is_causal)
        kk = tiles.shape[-1]
        lo = torch.where(ok, tiles, torch.zeros_like(tiles))
        hi = torch.where(ok, tiles + 1, torch.zeros_like(tiles))
        layouts = [
            BlockLayout.from_intervals(
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
        self._check_device(q)
        if q.shape[0] == 0 or q.shape[1] == 0:  # no rows: empty output, still connected to the graph
            return q * 0 + (k.sum() + v.sum()).to(q.dtype) * 0
        scores = self.block_scores(q, k)
        tiles, valid = self._choose(scores, causal)
        # log of each chosen tile's weight: a softmax of the scores over the row's chosen tiles
        log_w = torch.log_softmax(scores.gather(-1, tiles).masked_fill(~valid, float("-inf")), dim=-1)
        return _tile_attention(q, k, v, tiles, valid, log_w, self.block, causal, self.softmax_scale)
