"""Hybrid attention: all-to-all (Ulysses) inside a group of A ranks, ring attention across R of them.

The world is arranged as an R x A grid (:func:`hybrid_mesh`): global rank g sits at ring index
rho = g // A and all-to-all index a = g % A. The all-to-all groups are runs of A consecutive
ranks (one node when A is the GPUs per node: all-to-all traffic stays on NVLink); the ring
groups take one rank of each (ring traffic crosses nodes, overlapped with compute).

Tokens (:func:`hybrid_positions`): the sequence of N tokens is cut into ring shards, and each
ring shard into A pieces, one per member of the all-to-all group:

- layout="contiguous": rank (rho, a) holds tokens [(rho*A + a)*n, (rho*A + a + 1)*n), n = N/(R*A),
  i.e. global rank g holds the g-th contiguous shard (the same as ``shard_sequence(x, R*A, g)``).
- layout="zigzag" (balanced causal ring): the sequence is cut into 2R chunks; ring index rho owns
  chunks rho and 2R-1-rho, and rank (rho, a) holds the a-th of A equal pieces of each.

The all-to-all turns (B, n, H, D) into (B, A*n, H/A, D): the whole ring shard for H/A heads;
ring attention (dense: :func:`attn_ring.ring_attention`; dilated:
:func:`attn_ring.ring_dilated_attention`) runs across the ring group on those, and a second
all-to-all returns the output to (B, n, H, D). Gradients are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attn_core.config import DilatedConfig
from attn_core.validation import check_bool, check_cu_seqlens, check_qkv, resolve_softmax_scale

from .alltoall import AllToAllComm
from .comm import check_timeout, config_hash, dtype_code
from .exchange import DEFAULT_TIMEOUT_S, group_rank_and_size
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention
from .sharding import check_layout
from .ulysses import (
    check_heads_split,
    gather_padding_mask,
    heads_to_sequence,
    kv_heads_on_wire,
    packed_documents_code,
    repeat_kv_heads,
    sequence_to_heads,
)

__all__ = ["HYBRID_KINDS", "HybridMesh", "hybrid_attention", "hybrid_mesh", "hybrid_positions", "hybrid_shard"]

HYBRID_KINDS = ("dense", "dilated")


def _check_index(name: str, value: object, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    return value


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    return list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)


def hybrid_positions(
    seq_len: int, a2a_size: int, ring_size: int, a2a_rank: int, ring_rank: int, layout: str = "contiguous"
) -> torch.Tensor:
    """Global token positions (int64, in the order the rank holds them) of rank (ring_rank, a2a_rank)."""
    A, R = _check_size("a2a_size", a2a_size), _check_size("ring_size", ring_size)
    a, rho = _check_index("a2a_rank", a2a_rank, A), _check_index("ring_rank", ring_rank, R)
    check_layout(layout)
    chunks = 2 * R if layout == "zigzag" else R
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0 or seq_len % (chunks * A):
        rule = "N % (2 * R * A) == 0" if layout == "zigzag" else "N % (R * A) == 0"
        raise ValueError(
            f"sequence length N={seq_len!r} cannot be sharded over R={R} ring x A={A} all-to-all ranks with "
            f"layout {layout!r}: needs N > 0 and {rule}"
        )
    c = seq_len // chunks
    piece = c // A
    owned = [rho] if layout == "contiguous" else [rho, 2 * R - 1 - rho]
    return torch.cat([torch.arange(ch * c + a * piece, ch * c + (a + 1) * piece) for ch in owned])


def hybrid_shard(
    x: torch.Tensor,
    a2a_size: int,
    ring_size: int,
    a2a_rank: int,
    ring_rank: int,
    *,
    layout: str = "contiguous",
    dim: int = 1,
) -> torch.Tensor:
    """This rank's tokens of the full sequence ``x`` (B, N, ...) along ``dim`` (a copy)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    pos = hybrid_positions(x.shape[dim], a2a_size, ring_size, a2a_rank, ring_rank, layout)
    return x.index_select(dim, pos.to(x.device))


@dataclass(frozen=True)
class HybridMesh:
    """This rank's place in an R x A grid: its all-to-all group (size A) and its ring group (size R)."""

    a2a_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    a2a_size: int
    ring_size: int
    a2a_rank: int
    ring_rank: int
    how: str  # "device_mesh" or "new_group"

    def positions(self, seq_len: int, layout: str = "contiguous") -> torch.Tensor:
        """Global positions of the tokens this rank holds (see :func:`hybrid_positions`)."""
        return hybrid_positions(seq_len, self.a2a_size, self.ring_size, self.a2a_rank, self.ring_rank, layout)

    def shard(self, x: torch.Tensor, *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
        """This rank's tokens of the full sequence ``x`` (see :func:`hybrid_shard`)."""
        return hybrid_shard(x, self.a2a_size, self.ring_size, self.a2a_rank, self.ring_rank, layout=layout, dim=dim)


def hybrid_mesh(a2a_size: int, *, device_type: str | None = None, use_device_mesh: bool = True) -> HybridMesh:
    """Split the world of W ranks into W/A ring groups x A all-to-all groups; call it on every rank.

    Global rank g: all-to-all group {rho*A, ..., rho*A + A - 1} (consecutive ranks) with rho = g // A,
    ring group {a, a + A, a + 2A, ...} with a = g % A. use_device_mesh: build the groups through
    ``torch.distributed.device_mesh.init_device_mesh`` (mesh dims ("ring", "a2a"); device_type
    defaults to "cuda" for NCCL, else "cpu"), or with ``dist.new_group`` (every rank creates every
    group, in the same order).
    """
    rank, world = group_rank_and_size(None)
    A = _check_size("a2a_size", a2a_size)
    if world % A:
        raise ValueError(f"a2a_size={A} must divide the world size {world}")
    R = world // A
    rho, a = divmod(rank, A)
    if use_device_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        dev = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
        mesh = init_device_mesh(dev, (R, A), mesh_dim_names=("ring", "a2a"))
        return HybridMesh(mesh.get_group("a2a"), mesh.get_group("ring"), A, R, a, rho, "device_mesh")
    a2a_group = ring_group = None
    for i in range(R):  # every rank must take part in creating every group
        g = dist.new_group(list(range(i * A, (i + 1) * A)))
        if i == rho:
            a2a_group = g
    for j in range(A):
        g = dist.new_group(list(range(j, world, A)))
        if j == a:
            ring_group = g
    if a2a_group is None or ring_group is None:
        raise RuntimeError(f"rank {rank} found no group of its own in a {R} x {A} grid")
    return HybridMesh(a2a_group, ring_group, A, R, a, rho, "new_group")


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    a2a_group: dist.ProcessGroup | None,
    ring_group: dist.ProcessGroup | None,
    attention: str = "dense",
    is_causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "contiguous",
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_mode: str = "all",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    method: str = "auto",
) -> torch.Tensor:
    """Attention over a sequence sharded across an R x A grid; returns this rank's output shard.

    q: (B, n, H, D), k, v: (B, n, Hkv, D): this rank's tokens (see :func:`hybrid_positions`;
    :class:`HybridMesh` from :func:`hybrid_mesh` gives the groups and the shard). H must be a
    multiple of A. Returns (B, n, H, D) equal to the attention over the whole sequence at the
    same positions, with exact gradients.

    attention: "dense" (ring attention across ``ring_group``; layout "contiguous" or "zigzag";
    no key_padding_mask; cu_seqlens: int32 (num_docs + 1,) offsets of documents packed along the
    whole sequence of N tokens, B == 1, the same on every rank: attention within each document,
    documents may cross any rank's tokens) or "dilated" (ring dilated attention; layout "contiguous";
    segment_lengths, dilation_rates, head_mode "all" or "split"; key_padding_mask (B, n) bool
    allowed; cu_seqlens as for "dense", each document cut into segments from its own start). Any
    rates: all-to-all rank a runs the global heads [a*H/A, (a+1)*H/A) with their own offsets and
    head groups (ring dilated attention's ``head_base``/``total_heads``).
    """
    B, n, H, Hkv, D = check_qkv(q, k, v, key_padding_mask=key_padding_mask)
    causal = check_bool("is_causal", is_causal)
    scale = resolve_softmax_scale(softmax_scale, D)
    check_layout(layout)
    if not isinstance(attention, str) or attention not in HYBRID_KINDS:
        raise ValueError(f"hybrid attention must be one of {HYBRID_KINDS}, got {attention!r}")
    timeout = check_timeout(timeout_s)
    comm = AllToAllComm(a2a_group, timeout_s=timeout, method=method)
    A = comm.world_size
    _, R = group_rank_and_size(ring_group)
    shared = set(_group_ranks(a2a_group)) & set(_group_ranks(ring_group))
    if shared != {dist.get_rank()}:
        raise ValueError(
            f"a2a_group and ring_group must share exactly this rank ({dist.get_rank()}), as rows and columns of a "
            f"grid do (see hybrid_mesh); they share ranks {sorted(shared)}"
        )
    config: DilatedConfig | None = None
    if attention == "dense":
        if segment_lengths is not None or dilation_rates is not None or head_mode != "all":
            raise ValueError("segment_lengths, dilation_rates and head_mode belong to attention='dilated'")
        if key_padding_mask is not None:
            raise ValueError("attention='dense' (ring attention) takes no key_padding_mask; use attention='dilated'")
    else:
        if layout != "contiguous":
            raise ValueError(
                f"attention='dilated' runs ring dilated attention: layout must be 'contiguous', got {layout!r}"
            )
        if segment_lengths is None or dilation_rates is None:
            raise ValueError("attention='dilated' needs segment_lengths and dilation_rates")
        config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    chunks = 2 if layout == "zigzag" else 1
    if n % chunks:
        raise ValueError(f"layout 'zigzag' needs an even number of tokens per rank (two equal pieces), got n={n}")
    documents = packed_documents_code(cu_seqlens)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    cfg_sig = None if config is None else (config.segment_lengths, config.dilation_rates, config.head_mode)
    comm.handshake(
        {
            "batch": B,
            "shard_len": n,
            "heads": H,
            "kv_heads": Hkv,
            "head_dim": D,
            "dtype": dtype_code(q.dtype),
            "is_causal": int(causal),
            "softmax_scale": config_hash(float(scale).hex()),
            "attention": config_hash((attention, layout, cfg_sig, R)),
            "key_padding_mask": int(key_padding_mask is not None),
            "cu_seqlens": documents,
            "needs_grad": int(wants_grad),
        },
        label="hybrid attention",
    )
    check_heads_split(H, A, "all-to-all group")  # after the handshake: the same verdict on every rank
    if cu_seqlens is not None:  # before any data moves (the ring checks it again, cheaply)
        check_cu_seqlens(cu_seqlens, batch=B, seq_len=n * A * R, device=q.device)
    h = H // A
    k_w, v_w = repeat_kv_heads(k, v, kv_heads_on_wire(H, Hkv, A))
    mask = gather_padding_mask(key_padding_mask, comm, chunks=chunks)
    qh, kh, vh = sequence_to_heads([q, k_w, v_w], comm, chunks=chunks)
    if config is None:
        # the ring shards after the all-to-all are the ring layout's shards of the whole sequence
        # (hybrid_positions): the global offsets apply unchanged
        out_h = ring_attention(
            qh,
            kh,
            vh,
            group=ring_group,
            is_causal=causal,
            layout=layout,
            softmax_scale=scale,
            cu_seqlens=cu_seqlens,
            timeout_s=timeout,
        )
    else:
        out_h = ring_dilated_attention(
            qh,
            kh,
            vh,
            config.segment_lengths,
            config.dilation_rates,
            group=ring_group,
            is_causal=causal,
            key_padding_mask=mask,
            softmax_scale=scale,
            head_mode=config.head_mode,
            head_base=comm.rank * h,
            total_heads=H,
            cu_seqlens=cu_seqlens,
            timeout_s=timeout,
        )
    return heads_to_sequence(out_h, comm, chunks=chunks)
