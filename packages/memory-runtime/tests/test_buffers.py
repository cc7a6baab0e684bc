"""Typed buffer managers over a DeviceBufferPool (CPU) and over plain torch allocation."""

from __future__ import annotations

import pytest
import torch

from memory_runtime import (
    DeviceBufferPool,
    KVCacheBlocks,
    KVCacheFullError,
    RingDoubleBuffers,
    TorchProvider,
    Workspace,
)


@pytest.mark.parametrize("provider_kind", ["pool", "torch"])
def test_kv_cache_round_trip_and_block_accounting(provider_kind):
    pool = DeviceBufferPool("cpu") if provider_kind == "pool" else None
    kv = KVCacheBlocks(
        num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32, num_layers=2, provider=pool
    )
    g = torch.Generator().manual_seed(0)
    k_a, v_a = torch.randn(7, 2, 3, generator=g), torch.randn(7, 2, 3, generator=g)
    k_b, v_b = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    blocks_a = kv.allocate("a", 7)
    blocks_b = kv.allocate("b", 5)
    assert len(blocks_a) == 2 and len(blocks_b) == 2 and not set(blocks_a) & set(blocks_b)
    kv.write("a", 0, k_a, v_a, layer=1)
    kv.write("b", 0, k_b, v_b, layer=1)
    ka, va = kv.read("a", layer=1)
    kb, vb = kv.read("b", layer=1)
    assert torch.equal(ka, k_a) and torch.equal(va, v_a) and torch.equal(kb, k_b) and torch.equal(vb, v_b)
    # grow "a" by 3 tokens: 10 tokens need 3 blocks
    added = kv.extend("a", 3)
    assert len(added) == 1 and kv.length("a") == 10
    k_new = torch.randn(3, 2, 3, generator=g)
    kv.write("a", 7, k_new, k_new, layer=1)
    ka, _ = kv.read("a", layer=1)
    assert torch.equal(ka, torch.cat([k_a, k_new]))
    assert kv.block_table("a").tolist() == blocks_a + added
    assert kv.free_blocks == 8 - 5
    kv.free("a")
    assert kv.free_blocks == 8 - 2
    with pytest.raises(ValueError, match="not allocated"):
        kv.free("a")
    with pytest.raises(KVCacheFullError, match="free"):
        kv.allocate("c", 4 * 7)
    with pytest.raises(ValueError, match="outside"):
        kv.write("b", 4, k_b[:2], v_b[:2])
    with pytest.raises(ValueError, match="shape"):
        kv.write("b", 0, torch.zeros(2, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        kv.write("b", 0, torch.zeros(2, 2, 3, dtype=torch.float64), torch.zeros(2, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer"):
        kv.read("b", layer=2)
    with pytest.raises(ValueError, match="already allocated"):
        kv.allocate("b", 1)
    kv.close()
    if pool is not None:
        assert pool.stats().live_blocks == 0


def test_kv_cache_bad_config():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheBlocks(num_blocks=2, block_size=0, num_kv_heads=1, head_dim=4, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        KVCacheBlocks(num_blocks=2, block_size=4, num_kv_heads=1, head_dim=4, dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="provider"):
        KVCacheBlocks(num_blocks=2, block_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float16, provider=object())  # type: ignore[arg-type]


def test_ring_double_buffers_swap_and_release():
    pool = DeviceBufferPool("cpu")
    ring = RingDoubleBuffers([(2, 8, 1, 4), (2, 8, 1, 4)], torch.float16, provider=pool)
    cur, nxt = ring.current, ring.next
    assert len(cur) == 2 and all(t.shape == (2, 8, 1, 4) for t in cur + nxt)
    ptrs = {t.data_ptr() for t in cur + nxt}
    assert len(ptrs) == 4  # four distinct buffers
    for t in cur:
        t.fill_(1)
    for t in nxt:
        t.fill_(2)
    ring.swap()
    assert all(torch.all(t == 2) for t in ring.current) and all(torch.all(t == 1) for t in ring.next)
    ring.swap()
    assert ring.current[0].data_ptr() == cur[0].data_ptr()
    ring.close()
    assert pool.stats().live_blocks == 0
    with pytest.raises(ValueError, match="closed"):
        ring.current
    with pytest.raises(ValueError, match="shapes"):
        RingDoubleBuffers([], torch.float16)


def test_workspace_reuses_and_grows():
    pool = DeviceBufferPool("cpu")
    ws = Workspace(provider=pool)
    a = ws.get("scores", (4, 4), torch.float32)
    ptr = a.data_ptr()
    b = ws.get("scores", (2, 4), torch.float16)  # smaller: same memory
    assert b.data_ptr() == ptr and b.shape == (2, 4) and b.dtype == torch.float16
    c = ws.get("scores", (64, 64), torch.float32)  # larger: grows
    assert c.shape == (64, 64) and ws.nbytes == 64 * 64 * 4
    ws.get("other", 10, torch.int64)
    assert pool.stats().live_blocks == 2
    ws.release_all()
    assert pool.stats().live_blocks == 0 and ws.nbytes == 0
    with pytest.raises(ValueError, match="name"):
        ws.get("", (1,), torch.float32)


def test_torch_provider():
    p = TorchProvider()
    t = p.acquire((2, 3), torch.bfloat16, "cpu")
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16
    p.release(t)


def test_buffer_managers_reject_unknown_devices_with_value_error() -> None:
    import memory_runtime.buffers as b

    with pytest.raises(ValueError, match="device must name a torch device"):
        b.Workspace("nope")


def test_monitor_rejects_nan_interval_and_duration() -> None:
    from memory_runtime.monitor import main

    for flag in ("--interval", "--duration"):
        with pytest.raises(SystemExit):
            main(["--once", "--json", flag, "nan"])


def test_cpulist_with_zero_stride_is_malformed() -> None:
    from memory_runtime.numa import parse_cpulist

    with pytest.raises(ValueError, match="malformed cpulist range"):
        parse_cpulist("0-3:0")


def test_integer_arguments_take_numpy_ints_and_refuse_huge_or_bool_values() -> None:
    np = pytest.importorskip("numpy")
    kv = KVCacheBlocks(
        num_blocks=np.int64(4), block_size=np.int32(2), num_kv_heads=1, head_dim=2, dtype=torch.float32, num_layers=2
    )
    assert kv.allocate("a", np.int64(3)) and kv.length("a") == 3
    kv.write("a", np.int64(1), torch.ones(2, 1, 2), torch.ones(2, 1, 2), layer=np.int64(1))
    assert kv.read("a", layer=1)[0][1:].eq(1).all()
    with pytest.raises(TypeError, match="layer"):
        kv.read("a", layer=True)
    with pytest.raises(TypeError, match="num_tokens"):
        kv.extend("a", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2\\*\\*48"):
        TorchProvider().acquire((1 << 40, 1 << 40), torch.float32, "cpu")
    ws = Workspace(provider=DeviceBufferPool("cpu"))
    assert ws.get("x", (np.int64(2), torch.tensor(3)), torch.float32).shape == (2, 3)
    with pytest.raises(ValueError, match="2\\*\\*48"):
        ws.get("x", (1 << 62,), torch.float32)
    with pytest.raises(TypeError, match="bool"):
        ws.get("x", (True, 2), torch.float32)
