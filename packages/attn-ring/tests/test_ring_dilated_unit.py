"""Single-process tests of ring dilated attention: shard/segment geometry, which segments communicate,
the bytes the plan moves against a brute-force minimum, validation errors, and a world of size 1."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_core import MultiheadDilatedAttention, reference
from attn_core.config import DilatedConfig
from attn_core.testing import assert_close_to_reference
from attn_ring.exchange import exchange_rows, last_stats, reset_stats
from attn_ring.modules_dilated import RingDilatedAttention, RingMultiheadDilatedAttention
from attn_ring.ring_dilated import plan_ring_dilated, ring_dilated_attention
from attn_ring.ring_dilated_exec import local_pieces, storing_groups

# (N, W, H, Hkv, segments, rates, causal, head_mode)
GEOMETRIES = [
    (16, 2, 4, 4, (4, 8), (1, 2), False, "all"),  # segments shorter than / equal to a shard
    (24, 4, 4, 2, (4, 12, 24), (1, 2, 3), False, "all"),  # longer than a shard, spanning several ranks
    (24, 4, 4, 2, (4, 12, 24), (1, 2, 3), True, "all"),
    (15, 3, 6, 3, (3, 8), (1, 4), False, "all"),  # unaligned shards, short last segment
    (15, 3, 6, 2, (3, 8), (1, 4), True, "all"),
    (18, 3, 5, 1, (3, 8, 16), (1, 2, 4), False, "split"),
    (4, 4, 2, 1, (2, 4), (1, 2), True, "all"),  # one token per rank
]


def _plan(N, W, H, Hkv, segs, rates, causal, mode):
    return plan_ring_dilated(N, W, H, Hkv, segs, rates, is_causal=causal, head_mode=mode)


def _item_pairs(it, rank: int, n: int) -> set[tuple[int, int]]:
    pairs = set()
    for m in range(it.count):
        for t in range(it.rows):
            p = rank * n + it.base + m * it.seg_stride + t * it.row_stride
            pairs.update((p, j) for j in it.heads)
    return pairs


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_items_cover_every_selected_position_and_head_exactly_once(geom) -> None:
    N, W, H, _, segs, rates, _, mode = geom
    plan = _plan(*geom)
    cfg = DilatedConfig(segs, rates, mode)
    n = N // W
    for g, (w, r) in enumerate(zip(segs, rates)):
        seen: list[tuple[int, int]] = []
        for b, rp in enumerate(plan.ranks):
            for it in rp.items:
                if it.group == g:
                    pairs = _item_pairs(it, b, n)
                    assert all(b * n <= p < (b + 1) * n for p, _ in pairs), "an item's queries must be this rank's rows"
                    # every row of one segment run lies inside one segment of length w
                    assert all((p - it.base - b * n) % it.seg_stride < w for p, _ in pairs)
                    seen.extend(pairs)
        expected = [(p, j) for p in range(N) for j in cfg.heads_for_group(g, H) if p % r == j % r]
        assert sorted(seen) == sorted(expected)


def _brute_force_needed(N, W, H, Hkv, segs, rates, causal, mode, rank) -> set[tuple[int, int]]:
    """(key position, kv head) pairs outside the shard that some query of the shard attends to."""
    weights = reference.dilated_weights(N, H, segs, rates, is_causal=causal, head_mode=mode)  # (H, N, N)
    n = N // W
    lo, hi = rank * n, (rank + 1) * n
    per_kv = H // Hkv
    need = set()
    for j, qpos, kpos in torch.nonzero(weights > 0).tolist():
        if lo <= qpos < hi and not lo <= kpos < hi:
            need.add((kpos, j // per_kv))
    return need


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_received_rows_are_exactly_the_minimum(geom) -> None:
    """The plan receives each needed (position, kv head) K/V row once, and nothing else."""
    Hkv = geom[3]
    plan = _plan(*geom)
    for b, rp in enumerate(plan.ranks):
        got = {(int(key) // Hkv, int(key) % Hkv) for key in rp.needed}
        assert rp.needed.numel() == len(got)  # no duplicates
        assert got == _brute_force_needed(*geom, b)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_send_and_receive_sizes_agree(geom) -> None:
    N, W, _, Hkv, *_ = geom
    plan = _plan(*geom)
    n = N // W
    for a, b in itertools.permutations(range(W), 2):
        sent = plan.ranks[a].send_index.get(b)
        count = 0 if sent is None else sent.numel()
        assert count == plan.ranks[b].recv_counts[a]
        if sent is not None:  # local flat indices of a's rows, in b's receive order
            glob = sent + a * n * Hkv
            owned = plan.ranks[b].needed[(plan.ranks[b].needed // (n * Hkv)) == a]
            assert torch.equal(glob, owned)
    assert all(rp.recv_counts[b] == 0 for b, rp in enumerate(plan.ranks))  # nobody sends to itself


def test_segments_within_shards_need_no_communication() -> None:
    plan = plan_ring_dilated(64, 4, 8, 2, (4, 8, 16), (1, 2, 4), is_causal=False)
    for b in range(4):
        assert plan.communicating_segments(b) == []
        assert plan.ranks[b].rows_received == 0 and plan.ranks[b].send_index == {}


def test_which_segments_communicate() -> None:
    # N=24, W=4, shards [0,6) [6,12) [12,18) [18,24). w=4 is unaligned: segments [4,8) and [16,20)
    # cross shard edges, [8,12) and [12,16) and [20,24) sit inside one shard. w=12 spans ranks {0,1} and {2,3}.
    plan = plan_ring_dilated(24, 4, 2, 2, (4, 12), (1, 2))
    # (group, segment start)
    assert plan.communicating_segments(0) == [(0, 4), (1, 0)]
    assert plan.communicating_segments(1) == [(0, 4), (1, 0)]
    assert plan.communicating_segments(2) == [(0, 16), (1, 12)]
    assert plan.communicating_segments(3) == [(0, 16), (1, 12)]


@pytest.mark.parametrize(("N", "W", "r"), [(32, 4, 4), (64, 2, 8), (48, 3, 2)])
def test_bytes_match_the_closed_form_minimum(N: int, W: int, r: int) -> None:
    """One segment spanning the whole sequence, H = Hkv = r heads (one per offset), r | n:
    every rank needs the other ranks' rows at every offset once: Hkv * (N - n) / r rows = (N - n)."""
    H = Hkv = r
    plan = plan_ring_dilated(N, W, H, Hkv, (N,), (r,))
    n = N // W
    for b in range(W):
        assert plan.ranks[b].rows_received == Hkv * (N - n) // r
        assert plan.bytes_received(b, batch=2, head_dim=64, element_size=2) == Hkv * (N - n) // r * 2 * 2 * 64 * 2
    # causal: rank b needs only the earlier ranks' rows
    causal = plan_ring_dilated(N, W, H, Hkv, (N,), (r,), is_causal=True)
    assert [causal.ranks[b].rows_received for b in range(W)] == [Hkv * b * n // r for b in range(W)]


def test_rows_shared_by_two_groups_travel_once() -> None:
    # groups (8, 1) and (8, 2) select overlapping rows of the same segment: the union is sent, not the sum
    plan = plan_ring_dilated(8, 2, 2, 1, (8, 8), (1, 2))
    assert plan.ranks[0].rows_received == 4  # positions 4..7 of kv head 0, once


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"seq_len": 10, "world_size": 3}, ValueError, "divisible by the world size"),
        ({"seq_len": 0}, ValueError, "seq_len must be positive"),
        ({"world_size": 2.0}, TypeError, "world_size must be an int"),
        ({"num_heads": 3, "num_kv_heads": 2}, ValueError, "multiple of num_kv_heads"),
        ({"segment_lengths": (4, 6), "dilation_rates": (1, 4)}, ValueError, "not divisible by its dilation rate"),
        ({"head_mode": "bad"}, ValueError, "head_mode"),
        ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ],
)
def test_plan_validation(kwargs, exc, match) -> None:
    args = {
        "seq_len": 16,
        "world_size": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "segment_lengths": (4, 8),
        "dilation_rates": (1, 2),
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        plan_ring_dilated(
            args.pop("seq_len"),
            args.pop("world_size"),
            args.pop("num_heads"),
            args.pop("num_kv_heads"),
            args.pop("segment_lengths"),
            args.pop("dilation_rates"),
            **args,
        )


def test_call_without_process_group_is_a_clear_error() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not initialised"):
        ring_dilated_attention(q, q, q, (4,), (1,))


@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"q": torch.randn(1, 4, 2)}, ValueError, "4 dims"),
        (
            {"q": torch.randn(1, 0, 2, 8), "k": torch.randn(1, 0, 2, 8), "v": torch.randn(1, 0, 2, 8)},
            ValueError,
            "at least one token",
        ),
        ({"dilation_rates": (3,)}, ValueError, "not divisible"),
        ({"group": "world"}, TypeError, "ProcessGroup"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"key_padding_mask": torch.zeros(1, 4)}, TypeError, "torch.bool"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale"),
    ],
)
def test_call_validation(world_of_one, kwargs, exc, match) -> None:
    x = torch.randn(1, 4, 2, 8)
    args = {"q": x, "k": x, "v": x, "segment_lengths": (4,), "dilation_rates": (2,)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ring_dilated_attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("segment_lengths"), args.pop("dilation_rates"), **args
        )


def test_exchange_refuses_self_and_out_of_range_peers(world_of_one) -> None:
    with pytest.raises(ValueError, match="another rank"):
        exchange_rows({0: torch.zeros(2)}, {}, None)
    with pytest.raises(ValueError, match="another rank"):
        exchange_rows({}, {3: torch.zeros(2)}, None)


@pytest.mark.parametrize("views", [True, False], ids=["view-path", "gather-path"])
@pytest.mark.parametrize(
    ("causal", "mode", "Hkv", "padded"),
    [(False, "all", 3, False), (True, "all", 1, True), (False, "split", 3, True), (True, "split", 1, False)],
)
def test_world_of_one_matches_reference(
    world_of_one, monkeypatch, causal: bool, mode: str, Hkv: int, padded: bool, views: bool
) -> None:
    """With W = 1 every segment is local: outputs and gradients equal the float64 reference, no bytes move.
    Both compute paths: strided views through attn_core.sdpa_ops, and the portable gather path."""
    import attn_ring.ring_dilated as rd

    if not views:
        monkeypatch.setattr(rd, "view_path_available", lambda q: False)
    else:
        assert rd.view_path_available(torch.zeros(1, 1, 1, 8, dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    N, H, D, segs, rates = 11, 3, 8, (2, 4, 8), (1, 2, 4)
    q = torch.randn(2, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(2, N, generator=g) < 0.4
        mask[1] = True
    reset_stats()
    out = ring_dilated_attention(q, k, v, segs, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode)
    assert last_stats().bytes_sent == 0 and last_stats().bytes_received == 0
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference.dilated_attention(
        qr, kr, vr, segs, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode
    )
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, a, b)


@pytest.mark.parametrize("views", [True, False], ids=["view-path", "gather-path"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_padded_keys_values_never_reach_outputs_or_grads(world_of_one, monkeypatch, views: bool, bad: float) -> None:
    """NaN / inf in the k, v rows of padded keys: the result and gradients equal the float64
    reference on the same inputs with those rows zeroed, and padded keys get dk = dv = 0."""
    import attn_ring.ring_dilated as rd

    if not views:
        monkeypatch.setattr(rd, "view_path_available", lambda q: False)
    g = torch.Generator().manual_seed(13)
    N, H, Hkv, D, segs, rates = 12, 4, 2, 8, (4, 12), (1, 2)
    q = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, N, generator=g) < 0.4
    mask[:, 0] = False
    leaves = [q.clone().requires_grad_()] + [
        t.masked_fill(mask[:, :, None, None], bad).requires_grad_() for t in (k, v)
    ]
    out = ring_dilated_attention(*leaves, segs, rates, is_causal=True, key_padding_mask=mask)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.dilated_attention(*ref_leaves, segs, rates, is_causal=True, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        assert_close_to_reference(name, a, b)
    assert bool((grads[1][mask] == 0).all()) and bool((grads[2][mask] == 0).all())


def test_modules_validate_at_construction() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        RingDilatedAttention((4, 6), (1, 4))
    with pytest.raises(TypeError, match="ProcessGroup"):
        RingDilatedAttention((4,), (1,), group=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RingMultiheadDilatedAttention(8, 2, (4,), (1,), timeout_s=-1)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        RingMultiheadDilatedAttention(10, 4, (4,), (1,))


def test_multihead_module_is_a_drop_in_on_a_world_of_one(world_of_one) -> None:
    torch.manual_seed(0)
    ref = MultiheadDilatedAttention(12, 3, (2, 4), (1, 2), num_kv_heads=1, backend="reference", dtype=torch.float64)
    ring = RingMultiheadDilatedAttention(12, 3, (2, 4), (1, 2), num_kv_heads=1, dtype=torch.float64)
    assert isinstance(ring, MultiheadDilatedAttention)
    ring.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    out, weights = ring(x, x, x, is_causal=True)
    assert weights is None
    torch.testing.assert_close(out, ref(x, x, x, is_causal=True)[0])


@pytest.mark.parametrize("views", [True, False], ids=["view-path", "gather-path"])
@pytest.mark.parametrize("B", [1, 2])
def test_chunked_calls_match_reference(world_of_one, monkeypatch, B: int, views: bool) -> None:
    """Tiny call budgets cut every run of segments into many kernel calls: results are unchanged."""
    import attn_ring.ring_dilated as rd
    import attn_ring.ring_dilated_exec as rd_exec

    monkeypatch.setattr(rd_exec, "MAX_GATHER_ELEMENTS", 64)
    monkeypatch.setattr(rd_exec, "MAX_BLOCK_LOGITS", 64)
    if not views:
        monkeypatch.setattr(rd, "view_path_available", lambda q: False)
    g = torch.Generator().manual_seed(B)
    q = torch.randn(B, 37, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, 37, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, 37, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    out = rd.ring_dilated_attention(q, k, v, (4, 8), (1, 2), is_causal=True)
    ref, _ = reference.dilated_attention(q, k, v, (4, 8), (1, 2), is_causal=True)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        assert_close_to_reference(name, a, b)


@st.composite
def _geometries(draw):
    W = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    N = n * W
    groups = draw(st.integers(1, 3))
    segs, rates = [], []
    for _ in range(groups):
        r = draw(st.sampled_from([1, 2, 3, 4]))
        segs.append(r * draw(st.integers(1, max(1, (N + 2) // r))))
        rates.append(r)
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    return N, W, H, Hkv, tuple(segs), tuple(rates), draw(st.booleans()), draw(st.sampled_from(["all", "split"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_geometries())
def test_random_geometries_cover_and_receive_the_minimum(geom) -> None:
    """Property: on random valid geometries the items cover every selected (position, head) once per
    group and every rank receives exactly the brute-force set of needed K/V rows."""
    N, W, H, Hkv, segs, rates, _, mode = geom
    plan = _plan(*geom)
    cfg = DilatedConfig(segs, rates, mode)
    n = N // W
    for g, r in enumerate(rates):
        seen = [
            pair
            for b, rp in enumerate(plan.ranks)
            for it in rp.items
            if it.group == g
            for pair in _item_pairs(it, b, n)
        ]
        expected = [(p, j) for p in range(N) for j in cfg.heads_for_group(g, H) if p % r == j % r]
        assert sorted(seen) == sorted(expected)
    for b, rp in enumerate(plan.ranks):
        assert {(int(key) // Hkv, int(key) % Hkv) for key in rp.needed} == _brute_force_needed(*geom, b)


@pytest.mark.parametrize("views", [True, False], ids=["view-path", "gather-path"])
def test_non_contiguous_inputs(world_of_one, monkeypatch, views: bool) -> None:
    """q/k/v as (B, H, N, D) tensors transposed to (B, N, H, D), and a head dim with stride 2."""
    import attn_ring.ring_dilated as rd

    if not views:
        monkeypatch.setattr(rd, "view_path_available", lambda q: False)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v_full = torch.randn(2, 13, 2, 16, generator=g, dtype=torch.float64)
    v = v_full[..., ::2].requires_grad_()  # stride 2 in the head dim: copied to contiguous
    out = ring_dilated_attention(q, k, v, (4, 8), (1, 2), is_causal=True)
    ref, _ = reference.dilated_attention(q, k, v, (4, 8), (1, 2), is_causal=True)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert_close_to_reference("out", out, ref)
    for name, a, b in zip(
        ("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
    ):
        assert_close_to_reference(name, a, b)


# (N, W, local H, local Hkv, segments, rates, causal, head_mode, head_base, total_heads)
HEAD_RANGES = [
    (16, 2, 3, 3, (4, 8, 16), (1, 2, 4), False, "all", 3, 6),  # offsets 3, 0, 1 for rate 4
    (15, 3, 3, 1, (3, 6, 12), (1, 2, 4), True, "all", 5, 8),
    (16, 2, 3, 3, (4, 8, 16), (1, 2, 4), False, "split", 2, 6),  # straddles groups 0 and 1
    (18, 3, 2, 2, (3, 6, 18), (1, 2, 3), True, "split", 4, 6),  # only group 2
    (12, 4, 2, 1, (4, 12), (2, 4), False, "split", 1, 5),  # groups [0, 3) and [3, 5): heads 1, 2 in group 0
]


@pytest.mark.parametrize("geom", HEAD_RANGES)
def test_head_range_plan_covers_the_global_heads_and_receives_the_minimum(geom) -> None:
    """Local head j of a plan with head_base runs global head head_base + j: same positions, same
    groups, and each rank receives exactly the rows those global heads read."""
    N, W, H, Hkv, segs, rates, causal, mode, base, total = geom
    plan = plan_ring_dilated(
        N, W, H, Hkv, segs, rates, is_causal=causal, head_mode=mode, head_base=base, total_heads=total
    )
    cfg = DilatedConfig(segs, rates, mode)
    n = N // W
    for g, r in enumerate(rates):
        seen = [
            pair
            for b, rp in enumerate(plan.ranks)
            for it in rp.items
            if it.group == g
            for pair in _item_pairs(it, b, n)
        ]
        glob = cfg.heads_for_group(g, total)
        expected = [(p, j) for p in range(N) for j in range(H) if base + j in glob and p % r == (base + j) % r]
        assert sorted(seen) == sorted(expected)
    weights = reference.dilated_weights(N, total, segs, rates, is_causal=causal, head_mode=mode)[base : base + H]
    for b, rp in enumerate(plan.ranks):
        lo, hi = b * n, (b + 1) * n
        need = {
            (kpos, j // (H // Hkv))
            for j, qpos, kpos in torch.nonzero(weights > 0).tolist()
            if lo <= qpos < hi and not lo <= kpos < hi
        }
        assert {(int(key) // Hkv, int(key) % Hkv) for key in rp.needed} == need


def test_aligned_head_range_shares_the_plain_plan() -> None:
    plain = plan_ring_dilated(16, 2, 4, 2, (4, 8), (1, 2))
    assert plan_ring_dilated(16, 2, 4, 2, (4, 8), (1, 2), head_base=4, total_heads=8) is plain
    shifted = plan_ring_dilated(16, 2, 4, 2, (4, 8), (1, 2), head_base=1, total_heads=8)
    assert shifted is not plain and shifted.ranks[0].items != plain.ranks[0].items


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_base": 2}, "needs total_heads"),
        ({"head_base": -1, "total_heads": 4}, "non-negative int"),
        ({"head_base": True, "total_heads": 4}, "non-negative int"),
        ({"head_base": 3, "total_heads": 4}, "total_heads must be an int >= head_base \\+ H = 3 \\+ 2"),
        ({"total_heads": 1}, "total_heads must be an int"),
        ({"total_heads": 4.0}, "total_heads must be an int"),
    ],
)
def test_head_range_validation(world_of_one, kwargs, match) -> None:
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        plan_ring_dilated(4, 1, 2, 2, (4,), (2,), **kwargs)
    with pytest.raises(ValueError, match=match):
        ring_dilated_attention(x, x, x, (4,), (2,), **kwargs)


@pytest.mark.parametrize("views", [True, False], ids=["view-path", "gather-path"])
@pytest.mark.parametrize(
    ("causal", "mode", "Hkv"), [(False, "all", 6), (True, "all", 2), (True, "split", 6), (False, "split", 2)]
)
def test_world_of_one_head_range_matches_the_global_heads(
    world_of_one, monkeypatch, causal: bool, mode: str, Hkv: int, views: bool
) -> None:
    """Every range of 3 of 6 global heads that keeps whole GQA groups, run alone with head_base, equals
    those heads of the reference over all 6: outputs and q, k, v gradients (the range's kv heads are
    read by its query heads only)."""
    import attn_ring.ring_dilated as rd

    if not views:
        monkeypatch.setattr(rd, "view_path_available", lambda q: False)
    g = torch.Generator().manual_seed(11)
    N, H, h, D, segs, rates = 12, 6, 3, 8, (2, 4, 8), (1, 2, 4)
    q = torch.randn(2, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, N, H, D, generator=g, dtype=torch.float64)
    mask = torch.rand(2, N, generator=g) < 0.3
    ref, _ = reference.dilated_attention(q, k, v, segs, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    per_kv = H // Hkv
    for base in range(0, H - h + 1, per_kv):
        heads, kv = slice(base, base + h), slice(base // per_kv, (base + h) // per_kv)
        leaves = [t.detach()[:, :, sl].clone().requires_grad_() for t, sl in ((q, heads), (k, kv), (v, kv))]
        out = ring_dilated_attention(
            *leaves, segs, rates, is_causal=causal, key_padding_mask=mask, head_mode=mode, head_base=base, total_heads=H
        )
        grads = torch.autograd.grad(out, leaves, dout[:, :, heads])
        label = f"heads [{base}, {base + h})"
        assert_close_to_reference(f"{label} out", out, ref[:, :, heads])
        for name, got, want, sl in zip(("dq", "dk", "dv"), grads, ref_grads, (heads, kv, kv)):
            assert_close_to_reference(f"{label} {name}", got, want[:, :, sl])


# (N, W, H, Hkv, segments, rates, causal, head_mode, document lengths): documents crossing shards,
# one spanning three ranks, of length 1, empty, shorter than every segment, longer than the largest
PACKED_GEOMETRIES = [
    (24, 4, 4, 2, (3, 6, 16), (1, 2, 4), False, "all", [1, 0, 2, 17, 3, 1]),
    (24, 4, 4, 2, (3, 6, 16), (1, 2, 4), True, "all", [1, 0, 2, 17, 3, 1]),
    (15, 3, 6, 3, (3, 8), (1, 4), False, "split", [5, 0, 0, 9, 1]),
    (16, 2, 5, 1, (4, 16), (2, 4), True, "split", [16]),
]


def _packed_plan(N, W, H, Hkv, segs, rates, causal, mode, lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return cu, plan_ring_dilated(N, W, H, Hkv, segs, rates, is_causal=causal, head_mode=mode, cu_seqlens=cu)


@pytest.mark.parametrize("geom", PACKED_GEOMETRIES)
def test_packed_items_cover_and_receive_exactly_the_minimum(geom) -> None:
    """Packed documents: the items cover every (position, head) the packed reference selects once, and
    each rank receives exactly the (position, kv head) rows its queries attend to outside its shard."""
    N, W, H, Hkv, segs, rates, causal, mode, _ = geom
    cu, plan = _packed_plan(*geom)
    n = N // W
    weights = reference.dilated_weights(N, H, segs, rates, is_causal=causal, head_mode=mode, cu_seqlens=cu)
    cfg = DilatedConfig(segs, rates, mode)
    # selected (position, head) per group, from each document's own tiling
    doc = torch.searchsorted(cu[1:].long(), torch.arange(N), right=True)
    within = torch.arange(N) - cu.long()[doc]
    for g, (w, r) in enumerate(zip(segs, rates)):
        seen = []
        for b, rp in enumerate(plan.ranks):
            seen.extend(p for it in rp.items if it.group == g for p in _item_pairs(it, b, n))
        expected = [(p, j) for p in range(N) for j in cfg.heads_for_group(g, H) if int(within[p]) % w % r == j % r]
        assert sorted(seen) == sorted(expected)
    for b, rp in enumerate(plan.ranks):
        lo, hi = b * n, (b + 1) * n
        need = {
            (kpos, j // (H // Hkv))
            for j, qpos, kpos in torch.nonzero(weights > 0).tolist()
            if lo <= qpos < hi and not lo <= kpos < hi
        }
        got = {(int(key) // Hkv, int(key) % Hkv) for key in rp.needed}
        assert rp.needed.numel() == len(got) and got == need


def _covered_pairs(group) -> list[tuple[int, int]]:
    """The (row, query head) pairs a LocalGroup's pieces and tables compute, with repeats."""
    got = []
    for p in (p for lane in group.lanes for p in lane):
        rows = [p.start + m * p.seg_stride + t * p.row_stride for m in range(p.nseg) for t in range(p.rows)]
        got += [(r, p.q_h0 + i * p.q_hs) for r in rows for i in range(p.q_hn)]
    for t in group.tables:
        for start, length, h0 in zip(t.starts.tolist(), t.lengths.tolist(), t.q_head0.tolist()):
            got += [(start + j * t.stride, h0 + i * t.q_hs) for j in range(length) for i in range(t.q_hn)]
    return sorted(got)


@pytest.mark.parametrize("geom", PACKED_GEOMETRIES)
@pytest.mark.parametrize(("min_work", "max_pieces"), [(1 << 25, 16), (0, 2), (0, 64)])
def test_local_groups_split_each_group_into_pieces_and_tables(geom, min_work, max_pieces, monkeypatch) -> None:
    """Per group and pass, the local pieces and the kernel tables together cover each item's local
    (row, query head) pairs once; pieces of one start (shared rows) share a lane; at most max_pieces
    pieces. The forward's threshold is set apart (tables only): the passes' groups differ."""
    from attn_core import packed_views
    from attn_ring.ring_dilated_exec import local_groups

    monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK", min_work)  # the backward's
    monkeypatch.setattr(packed_views, "STRIDED_MIN_WORK_KERNEL_FORWARD", 1 << 62)  # the forward's
    monkeypatch.setattr(packed_views, "STRIDED_MAX_PIECES", max_pieces)
    _, plan = _packed_plan(*geom)
    mixed = 0  # groups with both pieces and tables
    for rp in plan.ranks:
        items_by_group: dict[int, list] = {}
        for it in rp.items:
            items_by_group.setdefault(it.group, []).append(it)
        storing = storing_groups(rp.items)
        forward = local_groups(rp, torch.device("cpu"), 8, backward=False)
        backward = local_groups(rp, torch.device("cpu"), 8, backward=True)
        assert len(forward) == len(backward) == len(items_by_group)
        assert all(not group.lanes for group in forward)
        mixed += sum(bool(g.lanes) and bool(g.tables) for g in backward)
        for fwd, bwd, (g, items) in zip(forward, backward, items_by_group.items()):
            want = sorted(p for it in items for p in _item_pairs(it, 0, 0))
            pieces = [p for lane in bwd.lanes for p in lane]
            assert fwd.first == bwd.first == (g in storing) and all(p.first == bwd.first for p in pieces)
            assert len(pieces) <= max_pieces and (min_work == 0 or not pieces)  # 2^25: these items are tiny
            assert _covered_pairs(fwd) == want and _covered_pairs(bwd) == want
            lane_of = {p.start: i for i, lane in enumerate(bwd.lanes) for p in lane}
            assert all(lane_of[p.start] == i for i, lane in enumerate(bwd.lanes) for p in lane)
    if geom is PACKED_GEOMETRIES[0] and (min_work, max_pieces) == (0, 2):
        assert mixed > 0  # the case the executor's concurrency is for


@pytest.mark.parametrize("geom", PACKED_GEOMETRIES)
def test_storing_groups_are_those_whose_heads_no_earlier_group_touches(geom) -> None:
    """Head mode "split": every group's heads are its own, so every group stores its local results;
    "all": each later group merges into the heads the first one stored."""
    mode = geom[7]
    _, plan = _packed_plan(*geom)
    for rp in plan.ranks:
        groups = sorted({it.group for it in rp.items})
        assert storing_groups(rp.items) == frozenset(groups if mode == "split" else groups[:1])
        pieces = local_pieces(rp.items, 1, 8, storing_groups(rp.items))
        assert {p.group for p in pieces if p.first} == storing_groups(rp.items)
        assert all(p.first == (p.group in storing_groups(rp.items)) for p in pieces)


def test_packed_plan_validation() -> None:
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 7"):
        plan_ring_dilated(8, 2, 2, 2, (4,), (1,), cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        plan_ring_dilated(8, 2, 2, 2, (4,), (1,), cu_seqlens=[0, 8])
    # one document [0, N) is the unpacked tiling
    one = plan_ring_dilated(24, 4, 4, 2, (4, 12), (1, 2), cu_seqlens=torch.tensor([0, 24], dtype=torch.int32))
    plain = plan_ring_dilated(24, 4, 4, 2, (4, 12), (1, 2))
    assert [rp.items for rp in one.ranks] == [rp.items for rp in plain.ranks]
