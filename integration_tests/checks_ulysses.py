"""Ulysses and hybrid attention across real processes vs attn_core.reference on the gathered sequence.

Every rank builds the same global inputs from a shared seed, runs the sequence-parallel function
on its tokens and compares its output and its q/k/v gradients with float64 autograd through the
dense-masked reference. Ulysses cases: dense, dilated (head_mode "all" with rank head offsets
that are not multiples of the rates, and "split"), block-sparse (per-head and shared layouts),
causal and not, GQA with Hkv a multiple of W, Hkv < W and Hkv not dividing W (kv heads repeated),
key padding, float32, both all-to-all methods, the module; packed documents (cu_seqlens) that
cross shard boundaries for every kind, windows for block-sparse (with a layout and without). Hybrid (2 x 2 grid): dense contiguous
and zigzag, dilated with padding, dilated with rates that do not divide the heads per all-to-all
rank (head_mode "all" and "split", causal, GQA), both ways of building the groups, the module.

Failure behaviour: mismatched shapes/options raise ValueError on every rank; a rank that leaves
after the forward, or never calls, makes the others raise within a bounded time.
Under gloo the ranks use the CPU; under NCCL (integration_tests/run_nccl.py) each rank its GPU.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from harness import expect_value_error, rank_device

from attn_core import reference
from attn_core.testing import assert_close_to_reference
from attn_ring import (
    HybridAttention,
    UlyssesAttention,
    hybrid_attention,
    hybrid_mesh,
    shard_sequence,
    ulysses_attention,
)


def has_attn_sparse() -> bool:
    return importlib.util.find_spec("attn_sparse") is not None


@dataclass(frozen=True)
class Case:
    name: str
    shard: int  # tokens per rank
    heads_per_rank: int = 2
    kv_heads: int | None = None  # None: one per query head
    attention: str = "dense"
    causal: bool = False
    padding: bool = False
    segments: tuple[int, ...] = ()
    rates: tuple[int, ...] = ()
    head_mode: str = "all"
    sparse: str = ""  # "per-head" or "shared" block layout (block size 16); "" with block_sparse: layout None
    packed: bool = False  # one sequence (B = 1) of documents (cu_seqlens) that cross the shard boundaries
    window: tuple[int, int] | None = None
    dtype: torch.dtype = torch.float64
    method: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


def cases(world_size: int) -> list[Case]:
    W = world_size
    out = [
        Case("dense", 4),
        Case("dense causal gqa kv<W padded", 5, heads_per_rank=2, kv_heads=1, causal=True, padding=True),
        Case("dense causal gqa kv=2 p2p", 3, heads_per_rank=2, kv_heads=2, causal=True, method="p2p"),
        Case("dense float32", 4, heads_per_rank=1, dtype=torch.float32),
        # h = 3 heads per rank: rank r starts at head 3r, not a multiple of the rates 2 and 4
        Case("dilated rank offsets", 6, heads_per_rank=3, attention="dilated", segments=(4, 8, 4 * W), rates=(1, 2, 4)),
        Case(
            "dilated causal gqa padded",
            5,
            heads_per_rank=3,
            kv_heads=3,
            attention="dilated",
            causal=True,
            padding=True,
            segments=(3, 2 * W + 2),
            rates=(1, 2),
        ),
        Case(
            "dilated split",
            6,
            heads_per_rank=3,
            kv_heads=1,
            attention="dilated",
            segments=(3, 8, 16),
            rates=(1, 2, 4),
            head_mode="split",
        ),
        Case(
            "dilated split causal",
            4,
            attention="dilated",
            segments=(4, 8),
            rates=(2, 4),
            head_mode="split",
            causal=True,
        ),
    ]
    if has_attn_sparse():
        out += [
            Case("block-sparse per-head", 8, heads_per_rank=2, kv_heads=1, attention="block_sparse", sparse="per-head"),
            Case("block-sparse shared causal", 8, attention="block_sparse", sparse="shared", causal=True),
        ]
    return out


def _inputs(case: Case, world_size: int, seed: int, head_split: int | None = None) -> dict[str, Any]:
    """Global inputs: N = shard * W tokens, H = heads_per_rank * head_split heads (default W)."""
    g = torch.Generator().manual_seed(seed)
    N, H = case.shard * world_size, case.heads_per_rank * (head_split or world_size)
    Hkv = case.kv_heads if case.kv_heads is not None else H
    B, D = (1 if case.packed else 2), 8
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    mask = None
    if case.padding:
        mask = torch.rand(B, N, generator=g) < 0.3
        mask[0, : N // 2 + 1] = True  # early queries of batch row 0 see only padding (causal): output 0
    block_mask = None
    if case.sparse:
        nb = -(-N // 16)
        heads = H if case.sparse == "per-head" else 1
        block_mask = torch.rand(heads, nb, nb, generator=g) < 0.5
        block_mask[:, :, 0] = True
        if heads > 1:
            block_mask[0, -1] = False  # a query block that sees no key: output 0, zero gradients
    cu_seqlens = None
    if case.packed:
        # documents [0, 3), [3, N/2 + 1), an empty one, then the rest: with W = 2 or 3 shards of
        # N/W tokens, the second document and the last cross shard boundaries
        cu_seqlens = torch.tensor([0, 3, N // 2 + 1, N // 2 + 1, N], dtype=torch.int32)
    return dict(q=q, k=k, v=v, dout=dout, mask=mask, block_mask=block_mask, cu_seqlens=cu_seqlens)


def _reference(case: Case, x: dict[str, Any], dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v = (x[n].to(dtype).detach().requires_grad_() for n in ("q", "k", "v"))
    kw = dict(is_causal=case.causal, key_padding_mask=x["mask"], dtype=dtype)
    cu = x["cu_seqlens"]
    if case.attention == "dense":
        out, _ = reference.dense_attention(q, k, v, cu_seqlens=cu, window_size=case.window, **kw)
    elif case.attention == "dilated":
        out, _ = reference.dilated_attention(
            q, k, v, case.segments, case.rates, head_mode=case.head_mode, cu_seqlens=cu, **kw
        )
    elif cu is None and case.window is None and case.sparse:
        out, _ = reference.block_sparse_attention(q, k, v, x["block_mask"], (16, 16), **kw)
    else:  # block-sparse tiles (or none) intersected with the token masks
        B, N, H, _ = q.shape
        allowed = reference.document_mask(N, N, cu_seqlens=cu, is_causal=case.causal, window_size=case.window)
        if case.sparse:
            allowed = allowed & reference.block_sparse_weights(x["block_mask"], (16, 16), N, N)
        weights = allowed.expand(B, H, N, N)
        if x["mask"] is not None:
            weights = weights & ~x["mask"][:, None, None, :]
        out, _ = reference.attention_from_weights(q, k, v, weights, dtype=dtype)
    out.backward(x["dout"].to(dtype))
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return [out.detach(), q.grad, k.grad, v.grad]


def _compare(
    label: str,
    case: Case,
    x: dict[str, Any],
    mine: Callable[[torch.Tensor], torch.Tensor],
    run: Callable[..., torch.Tensor],
) -> None:
    device = rank_device()
    ref = _reference(case, x, torch.float64)
    base = _reference(case, x, case.dtype) if case.dtype != torch.float64 else None
    shard = [mine(x[n]).to(device=device, dtype=case.dtype).contiguous().requires_grad_() for n in ("q", "k", "v")]
    mask = None if x["mask"] is None else mine(x["mask"]).to(device)
    out = run(*shard, key_padding_mask=mask)
    if out.shape != shard[0].shape or out.dtype != case.dtype:
        raise AssertionError(f"{label}: output {tuple(out.shape)} {out.dtype}, expected {tuple(shard[0].shape)}")
    out.backward(mine(x["dout"]).to(device=device, dtype=case.dtype))
    for i, (what, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *(s.grad for s in shard)))):
        if got is None:
            raise AssertionError(f"{label}: no gradient for {what}")
        assert_close_to_reference(
            f"{label} {what}", got.detach().cpu(), mine(ref[i]), None if base is None else mine(base[i])
        )


def run_ulysses_case(case: Case, rank: int, world_size: int, seed: int, *, module: bool = False) -> None:
    x = _inputs(case, world_size, seed)
    layout = None
    if case.sparse:
        from attn_sparse import BlockLayout

        layout = BlockLayout.from_dense(x["block_mask"], block_size=16)
    opts: dict[str, Any] = {}
    if case.attention == "dilated":
        opts = dict(segment_lengths=case.segments, dilation_rates=case.rates, head_mode=case.head_mode)
    elif case.attention == "block_sparse":
        opts = dict(layout=layout)
    masks = dict(cu_seqlens=x["cu_seqlens"], window_size=case.window)

    def mine(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, world_size, rank)

    if module:
        mod = UlyssesAttention(case.attention, timeout_s=60, **opts)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
            out: torch.Tensor = mod(q, k, v, is_causal=case.causal, **masks, **kw)
            return out
    else:

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
            return ulysses_attention(
                q,
                k,
                v,
                attention=case.attention,
                is_causal=case.causal,
                method=case.method,
                timeout_s=60,
                **opts,
                **masks,
                **kw,
            )

    _compare(f"[ulysses {case.name}, W={world_size}, rank {rank}]", case, x, mine, run)


def check_ulysses_cases(rank: int, world_size: int) -> list[str]:
    """Every ulysses case's output and gradients on this rank vs the float64 reference; returns the names."""
    done = []
    for i, case in enumerate(cases(world_size)):
        run_ulysses_case(case, rank, world_size, seed=100 * world_size + i)
        done.append(case.name)
    run_ulysses_case(
        Case("module", 4, attention="dilated", segments=(2, 4), rates=(1, 2), causal=True),
        rank,
        world_size,
        7,
        module=True,
    )
    done.append("module")
    return done


def packed_cases() -> list[Case]:
    """Packed documents crossing shard boundaries (cu_seqlens), and windows (block-sparse)."""
    out = [
        Case("dense packed", 6, packed=True),
        Case("dense packed causal gqa kv=1 padded", 5, kv_heads=1, causal=True, padding=True, packed=True),
        # 3 heads per rank: rank r's heads start at 3r, not a multiple of the rate 4
        Case(
            "dilated packed causal",
            6,
            heads_per_rank=3,
            kv_heads=3,
            attention="dilated",
            causal=True,
            segments=(2, 4, 8),
            rates=(1, 2, 4),
            packed=True,
        ),
        Case(
            "dilated packed split padded",
            5,
            heads_per_rank=3,
            attention="dilated",
            padding=True,
            segments=(2, 4, 16),
            rates=(1, 2, 4),
            head_mode="split",
            packed=True,
        ),
    ]
    if has_attn_sparse():
        out += [
            Case(
                "block-sparse packed per-head window",
                8,
                kv_heads=1,
                attention="block_sparse",
                sparse="per-head",
                window=(5, 2),
                packed=True,
            ),
            Case("block-sparse packed no layout causal", 7, attention="block_sparse", causal=True, packed=True),
            Case("block-sparse window no layout", 6, kv_heads=1, attention="block_sparse", window=(4, 0)),
        ]
    return out


def check_ulysses_packed(rank: int, world_size: int) -> list[str]:
    """Packed documents and windows: every case's output and gradients vs the float64 reference."""
    done = []
    for i, case in enumerate(packed_cases()):
        run_ulysses_case(case, rank, world_size, seed=500 + 10 * world_size + i)
        done.append(case.name)
    module = Case("module packed", 4, attention="dilated", segments=(2, 8), rates=(1, 2), causal=True, packed=True)
    run_ulysses_case(module, rank, world_size, 8, module=True)
    done.append(module.name)
    return done


def hybrid_cases() -> list[Case]:
    return [
        Case("dense", 4),
        Case(
            "dense zigzag causal gqa kv<A", 4, heads_per_rank=1, kv_heads=1, causal=True, options={"layout": "zigzag"}
        ),
        Case(
            "dilated causal padded",
            5,
            heads_per_rank=2,
            kv_heads=2,
            attention="dilated",
            causal=True,
            padding=True,
            segments=(4, 10),
            rates=(1, 2),
        ),
        Case("dilated long segments", 3, heads_per_rank=2, attention="dilated", segments=(6, 12), rates=(2, 2)),
        # H/A = 3 heads per all-to-all rank, rates 1, 2, 4: rank 1's heads start at global head 3
        # (offsets 3, 0, 1 at rate 4); "split" cuts 3 groups of 2 from the 6 global heads, so each
        # rank's range straddles two groups. Segments of 12 cross the ring shards (10 or 8 tokens).
        Case("dilated any rates", 5, heads_per_rank=3, attention="dilated", segments=(4, 6, 12), rates=(1, 2, 4)),
        Case(
            "dilated any rates causal gqa kv=2 padded",
            5,
            heads_per_rank=3,
            kv_heads=2,
            attention="dilated",
            causal=True,
            padding=True,
            segments=(4, 6, 12),
            rates=(1, 2, 4),
        ),
        Case(
            "dilated any rates split gqa kv=3",
            4,
            heads_per_rank=3,
            kv_heads=3,
            attention="dilated",
            segments=(4, 6, 12),
            rates=(1, 2, 4),
            head_mode="split",
        ),
        Case(
            "dilated any rates split causal gqa kv=2",
            5,
            heads_per_rank=3,
            kv_heads=2,
            attention="dilated",
            causal=True,
            segments=(2, 6, 20),
            rates=(1, 2, 4),
            head_mode="split",
        ),
    ]


def _check_mesh(rank: int, world_size: int, a2a_size: int, use_device_mesh: bool) -> Any:
    mesh = hybrid_mesh(a2a_size, use_device_mesh=use_device_mesh)
    rho, a = divmod(rank, a2a_size)
    a2a_ranks = [rho * a2a_size + i for i in range(a2a_size)]
    ring_ranks = list(range(a, world_size, a2a_size))
    got = (mesh.a2a_rank, mesh.ring_rank, *map(dist.get_process_group_ranks, (mesh.a2a_group, mesh.ring_group)))
    if got != (a, rho, a2a_ranks, ring_ranks):
        raise AssertionError(f"rank {rank}: {mesh.how} mesh gives {got}, expected {(a, rho, a2a_ranks, ring_ranks)}")
    return mesh


def check_hybrid(rank: int, world_size: int, a2a_size: int = 2) -> list[str]:
    """hybrid_attention on an (W/A) x A grid vs the float64 reference; returns the case names.

    The groups come from torch's DeviceMesh; a second mesh built with dist.new_group must put
    every rank in the same groups (checked, then used for the module case).
    """
    mesh = _check_mesh(rank, world_size, a2a_size, use_device_mesh=True)
    done = []
    for i, case in enumerate(hybrid_cases()):
        layout = case.options.get("layout", "contiguous")
        c = case  # heads_per_rank counts heads per all-to-all rank: H = heads_per_rank * A
        x = _inputs(c, world_size, 300 + i, head_split=a2a_size)
        opts: dict[str, Any] = {"layout": layout}
        if c.attention == "dilated":
            opts.update(segment_lengths=c.segments, dilation_rates=c.rates, head_mode=c.head_mode)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, _c: Case = c, _o: Any = opts, **kw: Any) -> Any:
            return hybrid_attention(
                q,
                k,
                v,
                a2a_group=mesh.a2a_group,
                ring_group=mesh.ring_group,
                attention=_c.attention,
                is_causal=_c.causal,
                timeout_s=60,
                **_o,
                **kw,
            )

        def mine(t: torch.Tensor, _layout: str = layout) -> torch.Tensor:
            return mesh.shard(t, layout=_layout)

        _compare(f"[hybrid {c.name}, {world_size // a2a_size}x{a2a_size}, rank {rank}]", c, x, mine, run)
        done.append(case.name)
    # the module, and groups that are not a grid: ValueError everywhere
    mesh = _check_mesh(rank, world_size, a2a_size, use_device_mesh=False)
    done.append("new_group mesh")
    c = Case("module", 4, heads_per_rank=2, causal=True)
    x = _inputs(c, world_size, 9, head_split=a2a_size)
    mod = HybridAttention(a2a_group=mesh.a2a_group, ring_group=mesh.ring_group, layout="zigzag", timeout_s=60)

    def run_mod(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        return mod(q, k, v, is_causal=True)

    _compare(f"[hybrid module, rank {rank}]", c, x, lambda t: mesh.shard(t, layout="zigzag"), run_mod)
    done.append("module")
    q = torch.randn(1, 4, 2 * a2a_size, 8, device=rank_device())
    expect_value_error(
        lambda: hybrid_attention(q, q, q, a2a_group=mesh.a2a_group, ring_group=mesh.a2a_group, timeout_s=60),
        "share exactly this rank",
    )
    done.append("groups that are not a grid refused")
    return done


def check_errors_raise_on_every_rank(rank: int, world_size: int) -> list[str]:
    """Mismatched shape / option / config on one rank, and H not a multiple of W: ValueError on every rank."""
    device = rank_device()
    t0 = time.monotonic()
    last = world_size - 1

    def qkv(n: int = 4, heads: int = 2 * world_size) -> list[torch.Tensor]:
        return [torch.randn(1, n, heads, 4, device=device) for _ in range(3)]

    if world_size == 1:  # a group of one cannot disagree with itself, and every H splits over one rank
        return ["still works"] if torch.isfinite(ulysses_attention(*qkv(), timeout_s=30)).all() else []
    expect_value_error(lambda: ulysses_attention(*qkv(6 if rank == last else 4), timeout_s=30), "shard_len")
    expect_value_error(lambda: ulysses_attention(*qkv(), is_causal=rank == last, timeout_s=30), "is_causal")
    expect_value_error(
        lambda: ulysses_attention(
            *qkv(),
            attention="dilated",
            segment_lengths=(4, 8 if rank == last else 16),
            dilation_rates=(1, 2),
            timeout_s=30,
        ),
        "attention",
    )
    expect_value_error(lambda: ulysses_attention(*qkv(heads=world_size + 1), timeout_s=30), f"H={world_size + 1}")
    # one rank with a head count W does not divide: the handshake reports it on every rank (no wait)
    bad_heads = world_size + 1 if rank == last else 2 * world_size
    expect_value_error(lambda: ulysses_attention(*qkv(heads=bad_heads), timeout_s=30), "heads=")
    out = ulysses_attention(*qkv(), timeout_s=30)
    if not torch.isfinite(out).all():
        raise AssertionError("ulysses produced non-finite values after the error cases")
    if time.monotonic() - t0 > 60:
        raise AssertionError(f"error cases took {time.monotonic() - t0:.0f} s: a mismatch must fail fast")
    return ["shape", "option", "config", "heads", "still works"]


def check_rank_leaving_is_an_error(rank: int, world_size: int, mode: str = "exit", timeout_s: float = 5.0) -> str:
    """mode "exit": the last rank runs the forward and leaves; the others' backward must raise.
    mode "absent": the last rank never calls; the others' forward must raise. Both within a bounded time."""
    q, k, v = (torch.randn(1, 4, 2 * world_size, 4, requires_grad=True) for _ in range(3))
    if mode == "absent" and rank == world_size - 1:
        return "left"
    t0 = time.monotonic()
    try:
        out = ulysses_attention(q, k, v, is_causal=True, timeout_s=timeout_s)
        if rank == world_size - 1:
            return "left"
        t0 = time.monotonic()
        out.sum().backward()
    except (TimeoutError, RuntimeError) as exc:
        elapsed = time.monotonic() - t0
        # bounded, with room for a loaded machine (process start-up and gloo's own poll interval)
        if elapsed > 3 * timeout_s + 20:
            raise AssertionError(f"raised only after {elapsed:.0f} s (timeout {timeout_s} s)") from exc
        if "rank" not in str(exc):
            raise AssertionError(f"error does not name the ranks involved: {exc}") from exc
        return "raised"
    raise AssertionError(f"{mode}: ulysses attention completed although a rank had left")


def check_hybrid_nccl(rank: int, world_size: int) -> list[str]:
    """The hybrid checks on a grid of all-to-all groups of 2 (needs an even world)."""
    return check_hybrid(rank, world_size) if world_size % 2 == 0 else ["needs an even world"]


NCCL_CHECKS = [check_ulysses_cases, check_ulysses_packed, check_errors_raise_on_every_rank, check_hybrid_nccl]
