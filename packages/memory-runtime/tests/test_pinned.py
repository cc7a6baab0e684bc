"""PinnedHostArena on CPU: exact sizing, sub-allocation/free/reuse, placement, errors, close."""

from __future__ import annotations

import mmap

import pytest
import torch

from memory_runtime import PinnedHostArena, load_libnuma

ODD_SIZES = [1_000_003, 3 * 2**20 + 17, 20_000_000 + 1, 7_777_777]


@pytest.mark.parametrize("nbytes", ODD_SIZES)
def test_exact_size(nbytes):
    with PinnedHostArena(nbytes) as arena:
        s = arena.stats()
        assert s.bytes_requested == nbytes
        assert s.bytes_reserved % mmap.PAGESIZE == 0 and s.bytes_reserved >= nbytes
        assert s.bytes_reserved / nbytes <= 1.01
        if not torch.cuda.is_available():
            assert not arena.pinned and s.bytes_pinned == 0
            assert any("no CUDA" in n for n in arena.notes)


def test_suballocate_free_reuse_and_data():
    arena = PinnedHostArena(1 << 20)
    a = arena.acquire((100, 3), torch.float32)
    b = arena.acquire((1000,), torch.bfloat16, "cpu")
    c = arena.acquire((0,), torch.float16)
    assert a.shape == (100, 3) and b.dtype == torch.bfloat16 and c.numel() == 0
    lo_a, lo_b = a.data_ptr(), b.data_ptr()
    assert lo_a + a.numel() * 4 <= lo_b or lo_b + b.numel() * 2 <= lo_a  # disjoint
    a.fill_(7)
    b.fill_(-1)
    assert torch.all(a == 7) and torch.all(b == -1)
    assert arena.address <= lo_a < arena.address + arena.stats().bytes_reserved
    arena.release(a)
    a2 = arena.acquire((100, 3), torch.float32)
    assert a2.data_ptr() == lo_a  # freed range reused (first fit from the lowest address)
    for t in (a2, b, c):
        arena.release(t)
    s = arena.stats()
    assert s.live_blocks == 0 and s.bytes_in_use == 0 and s.acquires == s.releases == 4
    # after freeing everything the whole arena is one free range again
    whole = arena.acquire((arena.stats().bytes_reserved,), torch.uint8)
    arena.release(whole)
    arena.close()
    assert arena.closed


def test_errors_and_use_after_close():
    with pytest.raises(ValueError, match="nbytes"):
        PinnedHostArena(0)
    with pytest.raises(TypeError, match="nbytes"):
        PinnedHostArena(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nbytes"):
        PinnedHostArena(1 << 70)  # refused before mmap is asked (it raised OverflowError)
    with pytest.raises(TypeError, match="nbytes"):
        PinnedHostArena(True)
    with pytest.raises(ValueError, match="NUMA node 99"):
        PinnedHostArena(4096, node=99)
    arena = PinnedHostArena(64 * 1024)
    with pytest.raises(MemoryError, match="no free range"):
        arena.acquire((1 << 20,), torch.uint8)
    with pytest.raises(ValueError, match="-1"):
        arena.acquire((-1,), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        arena.acquire((4,), "float32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host"):
        arena.acquire((4,), torch.float32, "meta")
    with pytest.raises(ValueError, match="host"):
        arena.acquire((4,), torch.float32, "nonsense:7")
    t = arena.acquire((4,), torch.float32)
    with pytest.raises(ValueError, match="still acquired"):
        arena.close()
    arena.release(t)
    with pytest.raises(ValueError, match="already released"):
        arena.release(t)
    with pytest.raises(ValueError, match="not acquired"):
        arena.release(torch.empty(4))
    arena.close()
    with pytest.raises(ValueError, match="closed"):
        arena.acquire((4,), torch.float32)
    with pytest.raises(ValueError, match="closed"):
        arena.release(t)
    arena.close()  # idempotent


def test_close_with_outstanding_views_is_safe():
    arena = PinnedHostArena(8192)
    t = arena.acquire((16,), torch.float32)
    arena.close(force=True)  # the caller still holds t: the mapping lives until t dies
    t.fill_(1.0)
    assert torch.all(t == 1.0)


def test_node_binding_and_placement_verification():
    lib, _reason = load_libnuma()
    arena = PinnedHostArena(1 << 20, node=0)
    if lib is None:
        assert not arena.bound and any("not bound" in n for n in arena.notes)
        ok, why = arena.verify_placement()
        assert ok is None and why
    else:
        assert arena.bound
        counts, _ = arena.placement()
        assert counts is not None and sum(counts.values()) > 0
        ok, detail = arena.verify_placement()
        assert ok is True, detail
    arena.close()


def test_close_unmaps_when_no_views_remain():
    arena = PinnedHostArena(8192)
    t = arena.acquire((16,), torch.float32)
    arena.release(t)
    del t
    arena.close()
    assert arena._mm.closed and not arena.notes[1:]


def test_close_keeps_mapping_while_views_live():
    arena = PinnedHostArena(8192)
    t = arena.acquire((16,), torch.float32)
    arena.release(t)
    arena.close()
    assert not arena._mm.closed and any("outlives" in n for n in arena.notes)
    t.fill_(2.0)  # still valid memory
    assert torch.all(t == 2.0)


def test_node_in_topology_but_not_on_this_machine(tmp_path):
    """A node the (synthetic) sysfs lists but libnuma does not have: a clear error, or an explained fallback."""
    for n in range(2):
        d = tmp_path / "devices" / "system" / "node" / f"node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(f"{n}\n")
    lib, _ = load_libnuma()
    if lib is not None and lib.max_node() < 1:
        with pytest.raises(ValueError, match="does not exist"):
            PinnedHostArena(4096, node=1, sysfs_root=str(tmp_path))
    else:
        arena = PinnedHostArena(4096, node=1, sysfs_root=str(tmp_path))
        assert arena.bound or any("not bound" in n for n in arena.notes)
        arena.close()
