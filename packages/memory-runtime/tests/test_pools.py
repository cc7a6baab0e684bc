"""DeviceBufferPool on CPU: correctness under threads, stats, stream-aware reuse (fake streams), errors."""

from __future__ import annotations

import os
import random
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_runtime import DeviceBufferPool, PoolExhaustedError, pools, round_size
from memory_runtime._native import load as load_native
from memory_runtime.ranges import ALIGNMENT, REGION_SHIFT, RangeAllocator

NATIVE, NATIVE_REASON = load_native()


@pytest.fixture(autouse=True, params=["native", "python"])
def pool_path(request, monkeypatch):
    """Every test here runs on both paths: the native hot path and the pure-Python one."""
    if request.param == "native":
        if NATIVE is None:
            pytest.skip(f"native hot path unavailable here: {NATIVE_REASON}")
    else:
        real = pools._resolve_native
        monkeypatch.setattr(pools, "_resolve_native", lambda native: real(False if native is None else native))
    return request.param


@pytest.fixture
def range_cls(pool_path):
    return NATIVE.RangeAllocator if pool_path == "native" else RangeAllocator


def test_native_path_is_built_where_ci_requires_it(pool_path):
    if os.environ.get("MEMORY_RUNTIME_REQUIRE_NATIVE") == "1":
        assert NATIVE is not None, NATIVE_REASON
    pool = DeviceBufferPool("cpu")
    assert pool.native == (pool_path == "native"), pool.native_reason
    assert DeviceBufferPool("cpu", native=False).native is False
    with pytest.raises(TypeError, match="native must be"):
        DeviceBufferPool("cpu", native="yes")


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.int32]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_round_size_bounded_waste_and_alignment():
    rng = random.Random(0)
    for n in [1, 511, 512, 513, 1000, 4097, 10**6 + 7] + [rng.randrange(1, 1 << 34) for _ in range(2000)]:
        r = round_size(n)
        assert r >= n and r % ALIGNMENT == 0
        assert r - n < max(n / 16, ALIGNMENT)
    assert round_size(0) == ALIGNMENT


def test_range_allocator_first_fit_both_ends_split_coalesce(range_cls):
    a = range_cls()
    a.free(0, 4096)
    x = a.alloc(1024)
    y = a.alloc(1024)
    z = a.alloc(2048)
    assert (x, y, z) == (0, 1024, 2048)
    assert a.alloc(512) is None and a.free_bytes == 0
    a.free(1024, 1024)  # hole in the middle
    a.free(0, 1024)  # merges with the right neighbour
    assert a.largest() == 2048 and len(a) == 1
    a.free(2048, 2048)  # merges with the left neighbour: whole region free again
    assert a.whole_region_free(0, 4096)
    # from the top: carved from the top of the highest range that fits
    assert a.alloc(1024, from_top=True) == 3072
    assert a.alloc(512) == 0
    assert a.ranges() == [(512, 2560)]
    # ranges of different regions never merge, even when their keys would touch
    b = range_cls()
    b.free(0, 8192)
    b.free(1 << REGION_SHIFT, 2048)
    assert b.alloc(1536, from_top=True) == (1 << REGION_SHIFT) + 512
    assert b.alloc(1536) == 0
    b.free(0, 1536)
    b.free((1 << REGION_SHIFT) + 512, 1536)
    assert b.whole_region_free(0, 8192) and b.whole_region_free(1, 2048) and len(b) == 2


def test_acquire_shapes_dtypes_and_reuse():
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 20)
    t = pool.acquire((3, 5, 7), torch.float16, "cpu")
    assert t.shape == (3, 5, 7) and t.dtype == torch.float16 and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % 64 == 0  # slab base: 64 B on CPU (512 on CUDA); offsets are multiples of 512
    t.fill_(1.5)
    assert torch.all(t == 1.5)
    s = pool.stats()
    assert s.bytes_requested == 3 * 5 * 7 * 2 and s.bytes_in_use == round_size(210) and s.live_blocks == 1
    ptr = t.data_ptr()
    pool.release(t)
    t2 = pool.acquire([3, 5, 7], torch.float16)  # a list shape: the same block back, a new tensor
    assert t2 is not t and t2.data_ptr() == ptr and t2.shape == (3, 5, 7)
    pool.release(t2)
    u = pool.acquire(100, torch.int64)  # int shape
    assert u.shape == (100,)
    pool.release(u)
    s = pool.stats()
    assert s.misses == 1 and s.hits == 2 and s.reservations == 1
    assert s.bytes_in_use == 0 and s.bytes_requested == 0 and s.live_blocks == 0


def test_zero_element_requests():
    pool = DeviceBufferPool("cpu")
    z = pool.acquire((0, 4), torch.float32)
    assert z.shape == (0, 4)
    pool.release(z)
    with pytest.raises(ValueError, match="zero-element"):
        pool.release(z)
    assert pool.stats().live_blocks == 0


def test_in_place_reshaped_tensor_takes_slow_path():
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 16)
    t = pool.acquire((4, 8), torch.float32)
    t.t_()  # caller changed the view in place
    pool.release(t)
    t2 = pool.acquire((4, 8), torch.float32)
    assert t2.shape == (4, 8) and t2.is_contiguous()
    pool.release(t2)


def test_large_request_gets_own_slab_and_trim_returns_it():
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 16)
    big = pool.acquire((2 << 20,), torch.uint8)  # > slab: a slab of its own (2 MiB granule, exact here)
    small = pool.acquire((16,), torch.float32)
    s = pool.stats()
    assert s.num_slabs == 2 and s.bytes_reserved == (2 << 20) + (1 << 16)
    pool.release(big)
    freed = pool.trim()
    assert freed == 2 << 20
    s = pool.stats()
    assert s.num_slabs == 1 and s.reservations_released == 1 and s.live_blocks == 1
    pool.release(small)
    assert pool.trim() == 1 << 16 and pool.stats().bytes_reserved == 0


def test_bounded_pool_raises_clear_error_and_recovers_after_release():
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 16, max_bytes=1 << 17)
    a = pool.acquire((1 << 16,), torch.uint8)
    b = pool.acquire((1 << 16,), torch.uint8)
    with pytest.raises(PoolExhaustedError, match="max_bytes"):
        pool.acquire((1 << 16,), torch.uint8)
    pool.release(a)
    c = pool.acquire((1 << 10, 16), torch.float32)  # reuses a's memory, no growth
    assert pool.stats().bytes_reserved <= 1 << 17
    pool.release(b)
    pool.release(c)
    # a request that needs more than the bound: trims free slabs, then fits
    d = pool.acquire((1 << 17,), torch.uint8)
    assert pool.stats().bytes_reserved <= 1 << 17
    pool.release(d)


def test_errors_name_the_bad_value():
    pool = DeviceBufferPool("cpu")
    with pytest.raises(ValueError, match="-3"):
        pool.acquire((2, -3), torch.float32)
    with pytest.raises(TypeError, match=r"2\.5"):
        pool.acquire((2, 2.5), torch.float32)
    with pytest.raises(TypeError, match="shape"):
        pool.acquire("abc", torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        pool.acquire((2,), "float32")
    with pytest.raises(TypeError, match="dtype"):
        pool.acquire((2,), float)
    with pytest.raises(ValueError, match="meta"):
        pool.acquire((2,), torch.float32, "meta")
    with pytest.raises(ValueError, match="slab_bytes"):
        DeviceBufferPool("cpu", slab_bytes=0)
    with pytest.raises(ValueError, match="max_bytes"):
        DeviceBufferPool("cpu", max_bytes=-1)
    with pytest.raises(ValueError, match="device"):
        DeviceBufferPool("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DeviceBufferPool("cuda")
    t = pool.acquire((8,), torch.float32)
    pool.release(t)
    with pytest.raises(TypeError, match=r"8\.0"):  # equal-hashing float shape must not hit the shape cache
        pool.acquire((8.0,), torch.float32)
    with pytest.raises(TypeError, match="True"):
        pool.acquire((True,), torch.float32)
    with pytest.raises(ValueError, match="double release"):
        pool.release(t)
    with pytest.raises(ValueError, match="foreign"):
        pool.release(torch.empty(8))
    with pytest.raises(TypeError, match="Tensor"):
        pool.release([1, 2])  # type: ignore[arg-type]


class FakeStreams:
    """Streams as names; fences complete only when the test says so (or someone waits on them)."""

    def __init__(self) -> None:
        self.current = "s0"
        self.fences: list[dict] = []

    def current_key(self):
        return self.current

    def fence(self, key):
        f = {"stream": key, "done": False}
        self.fences.append(f)
        return f

    def done(self, fence) -> bool:
        return fence["done"]

    def wait(self, fence) -> None:
        fence["done"] = True

    def complete(self) -> None:
        for f in self.fences:
            f["done"] = True


def test_stream_aware_reuse_waits_for_the_releasing_stream():
    streams = FakeStreams()
    pool = DeviceBufferPool("cpu", slab_bytes=4096, stream_ops=streams)
    a = pool.acquire((1024,), torch.float32)  # fills the only slab
    a_ptr = a.data_ptr()
    pool.release(a)  # released on s0
    streams.current = "s1"
    b = pool.acquire((1024,), torch.float32)
    assert b.data_ptr() != a_ptr, "reused s0's block on s1 before s0's fence completed"
    assert streams.fences and streams.fences[0]["stream"] == "s0"
    assert pool.stats().reservations == 2
    pool.release(b)
    # same stream: immediate reuse, no fence needed
    b2 = pool.acquire((1024,), torch.float32)
    assert b2.data_ptr() == b.data_ptr()
    pool.release(b2)
    # back on s0: its own (fenced, still pending) block is reusable at once by s0 itself
    streams.current = "s0"
    a2 = pool.acquire((1024,), torch.float32)
    assert a2.data_ptr() == a_ptr and pool.stats().reservations == 2
    pool.release(a2)
    # s2: s0's and s1's blocks were released after every fence so far: not reusable yet
    streams.current = "s2"
    c = pool.acquire((1024,), torch.float32)
    assert c.data_ptr() not in (a_ptr, b.data_ptr()) and pool.stats().reservations == 3
    # once those fences completed, s2 takes a block released on another stream without growing
    streams.complete()
    d = pool.acquire((1024,), torch.float32)
    assert d.data_ptr() in (a_ptr, b.data_ptr()) and pool.stats().reservations == 3
    pool.release(c)
    pool.release(d)


def test_bounded_pool_waits_on_fences_instead_of_growing():
    streams = FakeStreams()
    pool = DeviceBufferPool("cpu", slab_bytes=4096, max_bytes=4096, stream_ops=streams)
    a = pool.acquire((4096,), torch.uint8)
    ptr = a.data_ptr()
    pool.release(a)
    streams.current = "s1"
    b = pool.acquire((4096,), torch.uint8)  # bound reached: waits for s0's fence, then reuses
    assert b.data_ptr() == ptr and pool.stats().reservations == 1
    assert all(f["done"] for f in streams.fences)
    pool.release(b)


def test_threads_no_overlap_and_balanced_stats():
    """8 threads x 50k random acquire/release each; owners stamp and verify their buffers;
    no two live buffers overlap."""
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 20)
    n_threads, per_thread = 8, 50_000
    total_ops = n_threads * per_thread
    errors: list[str] = []
    live_ranges: dict[int, tuple[int, int]] = {}
    ranges_lock = threading.Lock()
    barrier = threading.Barrier(n_threads)

    def check_and_add(t: torch.Tensor, owner: int) -> None:
        lo, hi = t.data_ptr(), t.data_ptr() + _nbytes(t)
        with ranges_lock:
            for other, (olo, ohi) in live_ranges.items():
                if lo < ohi and olo < hi:
                    errors.append(f"overlap: {owner} [{lo},{hi}) with {other} [{olo},{ohi})")
            live_ranges[owner] = (lo, hi)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        held: list[tuple[torch.Tensor, int, int]] = []
        serial = 0
        barrier.wait()
        try:
            for _ in range(per_thread):
                if held and (len(held) >= 6 or rng.random() < 0.5):
                    t, stamp, key = held.pop(rng.randrange(len(held)))
                    if not bool(torch.all(t == stamp)):
                        errors.append(f"thread {tid}: buffer {key} was overwritten by another owner")
                    with ranges_lock:
                        del live_ranges[key]
                    pool.release(t)
                else:
                    dtype = rng.choice([torch.int32, torch.int64, torch.float32])
                    shape = (rng.randint(1, 64), rng.choice([1, 3, 8, 17]))
                    # some buffers long-lived: both ends of the slabs are carved concurrently
                    t = pool.acquire(shape, dtype, "cpu", long_lived=rng.random() < 0.2)
                    serial += 1
                    key = tid * 10**7 + serial
                    stamp = key % 2**24  # exact in every dtype used
                    check_and_add(t, key)
                    t.fill_(stamp)
                    held.append((t, stamp, key))
            for t, stamp, key in held:
                if not bool(torch.all(t == stamp)):
                    errors.append(f"thread {tid}: buffer {key} overwritten")
                with ranges_lock:
                    del live_ranges[key]
                pool.release(t)
        except Exception as exc:
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings inside acquire/release
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors, errors[:5]
    s = pool.stats()
    assert s.acquires == s.releases and s.acquires > total_ops // 3
    assert s.live_blocks == 0 and s.bytes_in_use == 0 and s.bytes_requested == 0
    assert s.bytes_cached == s.bytes_reserved
    assert s.hits + s.misses == s.acquires and s.misses == s.reservations
    assert s.peak_bytes_in_use <= s.peak_bytes_reserved
    # everything is free again: trim gives every slab back
    assert pool.trim() == s.bytes_reserved and pool.stats().bytes_reserved == 0


def test_variable_length_trace_stops_reserving_after_warmup():
    """A repeated variable-N attention-like trace: no new slabs after the first pass."""
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 20)
    rng = random.Random(3)
    lengths = [rng.choice(range(64, 1025, 64)) for _ in range(40)]

    def one_pass() -> None:
        for n in lengths:
            bufs = [pool.acquire((1, n, 4, 16), torch.float16) for _ in range(4)]  # q, k, v, out
            bufs.append(pool.acquire((1, 4, n), torch.float32))  # lse
            for b in bufs:
                pool.release(b)

    one_pass()
    reserved = pool.stats().reservations
    for _ in range(3):
        one_pass()
    s = pool.stats()
    assert s.reservations == reserved and s.live_blocks == 0
    assert s.peak_bytes_in_use >= s.peak_bytes_requested


def _range_allocators() -> list:
    return [RangeAllocator(), NATIVE.RangeAllocator()] if NATIVE is not None else [RangeAllocator()]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 10**6)), min_size=1, max_size=120))
def test_range_allocator_invariants(ops):
    """Random alloc (either end) / free sequences over two regions: no overlap, exact accounting,
    full coalescing; the native allocator gives the very same answers as the Python one."""
    unit = 512
    sizes = {0: 64 * unit, 1: 16 * unit}
    allocators = _range_allocators()
    for a in allocators:
        for r, n in sizes.items():
            a.free(r << REGION_SHIFT, n)
    a = allocators[0]
    live: list[tuple[int, int]] = []
    for is_alloc, units, pick in ops:
        if is_alloc or not live:
            keys = [x.alloc(units * unit, from_top=bool(pick & 1)) for x in allocators]
            assert len(set(keys)) == 1, keys
            key = keys[0]
            if key is None:
                assert a.largest() < units * unit
                continue
            region, offset = key >> REGION_SHIFT, key & ((1 << REGION_SHIFT) - 1)
            assert region in sizes and offset + units * unit <= sizes[region]
            for k2, n2 in live:
                assert key + units * unit <= k2 or k2 + n2 <= key, "overlap"
            live.append((key, units * unit))
        else:
            key, n = live.pop(pick % len(live))
            for x in allocators:
                x.free(key, n)
        assert a.free_bytes == sum(sizes.values()) - sum(n for _, n in live)
        assert all(x.ranges() == a.ranges() and x.largest() == a.largest() for x in allocators)
    for key, n in live:
        for x in allocators:
            x.free(key, n)
    for x in allocators:
        assert all(x.whole_region_free(r, n) for r, n in sizes.items()) and len(x) == 2
        x.drop_region(1, sizes[1])
        assert x.ranges() == [(0, sizes[0])] and x.free_bytes == sizes[0]
        assert x.take_all() == [(0, sizes[0])] and len(x) == 0 and x.free_bytes == 0


def test_native_and_python_pools_agree_on_a_random_trace():
    """The same random acquire/release sequence (long-lived hints, growth, trims) on both paths:
    identical offsets, stats and snapshots at every step."""
    if NATIVE is None:
        pytest.skip(f"native hot path unavailable here: {NATIVE_REASON}")
    pools_ = [DeviceBufferPool("cpu", slab_bytes=1 << 16, native=flag) for flag in (True, False)]
    rng = random.Random(11)
    live: list[list[torch.Tensor]] = []
    dtypes = [torch.float16, torch.float32, torch.uint8]
    for step in range(3000):
        if live and rng.random() < 0.45:
            pair = live.pop(rng.randrange(len(live)))
            for p, t in zip(pools_, pair):
                p.release(t)
        else:
            shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
            dtype = rng.choice(dtypes)
            long_lived = rng.random() < 0.2
            # the same shape as numpy ints now and then: both paths take it like the int tuple
            arg = [np.int64(d) for d in shape] if rng.random() < 0.1 else shape
            pair = [p.acquire(arg, dtype, long_lived=long_lived) for p in pools_]
            offsets = [
                t.data_ptr() - p._slab_base[p._live[t.data_ptr()][0] >> REGION_SHIFT] for p, t in zip(pools_, pair)
            ]
            assert offsets[0] == offsets[1] and pair[0].shape == pair[1].shape == shape
            live.append(pair)
        if step % 500 == 499:
            assert pools_[0].stats() == pools_[1].stats()
            strip = [[{k: v for k, v in seg.items() if k != "address"} for seg in p.memory_snapshot()] for p in pools_]
            assert strip[0] == strip[1]
    for pair in live:
        for p, t in zip(pools_, pair):
            p.release(t)
    assert pools_[0].stats() == pools_[1].stats()
    assert pools_[0].trim() == pools_[1].trim() > 0


def hostile_shapes() -> list:
    big = 1 << 40
    return [
        (np.int64(8),),
        (8, np.int32(2)),
        [np.uint8(3), 5],
        np.int64(4),
        (torch.tensor(3),),
        (2, torch.tensor(5, dtype=torch.int16)),
        (True,),
        (np.bool_(True),),
        (torch.tensor(True),),
        (8.0,),
        (np.float32(8),),
        (-1,),
        (4, np.int64(-2)),
        (big, big),
        (1 << 62,),
        (1 << 70,),
        1 << 63,
        (1 << 31,) * 3,
        (0, 1 << 70),
        (0, 1 << 62, 1 << 62),
        (0, 1 << 20, 1 << 20),
        (1 << 48,),
        (1,) * 65,
        "abc",
    ]


def outcome(pool: DeviceBufferPool, shape, dtype=torch.float32):
    """What one acquire does: the tensor's shape and offset, or the error's type and message."""
    try:
        t = pool.acquire(shape, dtype)
    except Exception as exc:  # compared across paths
        return type(exc).__name__, str(exc).replace(str(pool.device), "<dev>")
    offset = pool._live[t.data_ptr()][0] if t.numel() else None
    pool.release(t)
    return tuple(t.shape), t.dtype, offset


@pytest.mark.parametrize("max_bytes", [None, 1 << 20])
def test_native_and_python_pools_agree_on_hostile_shapes(max_bytes):
    """Both paths normalise shapes the same way before anything is allocated: numpy ints and
    integer tensors are taken, bools / negatives / floats refused with TypeError or ValueError,
    huge dimensions and overflowing products refused with ValueError (or the bounded pool's
    exhaustion error), never a raw torch error; cold (first sight) and warm (cached) alike."""
    if NATIVE is None:
        pytest.skip(f"native hot path unavailable here: {NATIVE_REASON}")
    pools_ = [DeviceBufferPool("cpu", slab_bytes=1 << 16, max_bytes=max_bytes, native=flag) for flag in (True, False)]
    for _ in range(2):  # the second pass finds every valid shape in the cache
        for shape in hostile_shapes():
            got = [outcome(p, shape) for p in pools_]
            assert got[0] == got[1], (shape, got)
            kind = got[0][0]
            if isinstance(kind, tuple):  # served: the shape is the integer shape asked for
                assert isinstance(shape, (tuple, list, np.integer))
                continue
            assert kind in ("TypeError", "ValueError", "PoolExhaustedError"), (shape, got[0])
            assert "unpack" not in got[0][1] and "Overflow" not in got[0][1], got[0]
    ok = {repr(s): outcome(pools_[0], s) for s in hostile_shapes()}
    assert ok[repr((np.int64(8),))][:2] == ((8,), torch.float32)
    assert ok[repr((2, torch.tensor(5, dtype=torch.int16)))][:2] == ((2, 5), torch.float32)
    assert ok[repr((0, 1 << 20, 1 << 20))][:2] == ((0, 1 << 20, 1 << 20), torch.float32)
    for bad in [(True,), (np.bool_(True),), (torch.tensor(True),), (8.0,), (np.float32(8),), "abc"]:
        assert ok[repr(bad)][0] == "TypeError", bad
    for bad in [(-1,), (4, np.int64(-2)), (1 << 70,), 1 << 63, (0, 1 << 70), (1 << 48,), (1,) * 65]:
        assert ok[repr(bad)][0] == "ValueError", bad
    for huge in [(1 << 40, 1 << 40), (1 << 62,), (1 << 31,) * 3, (0, 1 << 62, 1 << 62)]:
        assert ok[repr(huge)][0] == "ValueError" and "2**48" in ok[repr(huge)][1], huge
    if max_bytes is not None:  # within the per-request bound but over max_bytes: the pool's own error
        for p in pools_:
            with pytest.raises(PoolExhaustedError, match="max_bytes"):
                p.acquire((1 << 45,), torch.float32)
    for p in pools_:
        assert p.stats().live_blocks == 0 and p.stats().bytes_reserved <= (max_bytes or 1 << 30)


def test_reserve_and_sizes_take_numpy_ints_and_refuse_huge_values():
    pool = DeviceBufferPool("cpu", slab_bytes=np.int64(1 << 16), max_bytes=np.int64(1 << 20))
    assert pool.slab_bytes == 1 << 16 and pool.max_bytes == 1 << 20 and type(pool.max_bytes) is int
    pool.reserve(np.int32(4096))
    assert pool.stats().bytes_reserved == 4096
    with pytest.raises(ValueError, match="nbytes"):
        pool.reserve(1 << 70)
    with pytest.raises(TypeError, match="nbytes"):
        pool.reserve(True)
    with pytest.raises(ValueError, match="slab_bytes"):
        DeviceBufferPool("cpu", slab_bytes=1 << 70)


def test_pool_fragmentation_report_in_torch_format():
    from memory_runtime import FragmentationReport

    pool = DeviceBufferPool("cpu", slab_bytes=64 * 1024)
    a = pool.acquire((1000,), torch.float32)  # 4000 B -> 4096 B block
    b = pool.acquire((4096,), torch.uint8)
    c = pool.acquire((3000,), torch.uint8)
    pool.release(b)  # a hole between a and c
    snap = pool.memory_snapshot()
    assert len(snap) == 1 and snap[0]["total_size"] == 64 * 1024
    blocks = snap[0]["blocks"]
    assert sum(blk["size"] for blk in blocks) == 64 * 1024  # blocks tile the slab exactly
    # short-lived blocks are carved from the top: [free, c, hole (b), a]
    assert [blk["state"] for blk in blocks] == ["inactive", "active_allocated", "inactive", "active_allocated"]
    stats = pool.memory_stats()
    assert stats["allocated_bytes.all.current"] == pool.stats().bytes_in_use
    assert stats["inactive_split_bytes.all.current"] == 64 * 1024 - stats["allocated_bytes.all.current"]
    rep = FragmentationReport.from_stats(stats, snap, device="pool:cpu")
    assert rep.internal_fragmentation == pytest.approx(1 - (4000 + 3000) / stats["allocated_bytes.all.current"])
    free = 64 * 1024 - stats["allocated_bytes.all.current"]
    assert rep.largest_hole_bytes == free - 4096 and rep.largest_hole_ratio == pytest.approx((free - 4096) / free)
    pool.release(a)
    pool.release(c)
    assert pool.memory_stats()["inactive_split_bytes.all.current"] == 0  # no live block: nothing is split


def _varlen_trace(pool: DeviceBufferPool, seed: int, steps: int, hints: bool) -> int:
    """q, k, v, lse, out per step (+ dq, dk, dv on half the steps) for a random N; each step's out
    lives until the next step's out exists (long_lived when ``hints``). Returns the peak requested bytes."""
    rng = random.Random(seed)
    prev = None
    cur = peak = 0
    for _ in range(steps):
        n = rng.randrange(64, 2049, 64)
        big = (1, n, 4, 16)
        bufs = [pool.acquire(big, torch.float16) for _ in range(3)]
        bufs.append(pool.acquire((1, 4, n), torch.float32))
        out = pool.acquire(big, torch.float16, long_lived=hints)
        step_bytes = 4 * n * 4 * 16 * 2 + 4 * n * 4
        grads = [pool.acquire(big, torch.float16) for _ in range(3)] if rng.random() < 0.5 else []
        peak = max(peak, cur + step_bytes + len(grads) * n * 4 * 16 * 2)
        for t in grads + bufs:
            t.fill_(1)
            pool.release(t)
        if prev is not None:
            pool.release(prev)
        prev = out
        cur = n * 4 * 16 * 2
    if prev is not None:
        pool.release(prev)
    return peak


def test_long_lived_placement_keeps_free_space_in_one_piece():
    """With the out of each step marked long_lived, a slab the size of the peak (plus rounding)
    holds the whole trace, and between steps the free space is one range next to the live out."""
    probe = DeviceBufferPool("cpu", slab_bytes=64 << 20)
    _varlen_trace(probe, seed=5, steps=60, hints=True)
    peak_in_use = probe.stats().peak_bytes_in_use
    pool = DeviceBufferPool("cpu", slab_bytes=64 << 20)
    pool.reserve(peak_in_use)  # exactly the peak of rounded blocks: no slack at all
    _varlen_trace(pool, seed=5, steps=60, hints=True)
    s = pool.stats()
    assert s.reservations == 1 and s.misses == 0 and s.live_blocks == 0
    # mid-trace: one long-lived buffer live -> at most two free ranges, one on each side of it
    out = pool.acquire((1, 512, 4, 16), torch.float16, long_lived=True)
    snap = pool.memory_snapshot()[0]["blocks"]
    assert [b["state"] for b in snap].count("inactive") <= 2
    assert snap[0]["state"] == "active_allocated" or snap[-1]["state"] == "active_allocated"  # at an end
    pool.release(out)


def test_consolidate_then_a_new_trace_reserves_nothing():
    """Warm-up trace, consolidate(headroom), then a trace with different lengths: no new slab, and
    reserved stays within 1.1x of the measured pass's peak request (the bench's targets, small)."""
    pool = DeviceBufferPool("cpu", slab_bytes=1 << 20)  # small slabs: the warm-up grows several
    _varlen_trace(pool, seed=0, steps=150, hints=True)
    warm = pool.stats()
    assert warm.num_slabs > 1
    with pytest.raises(ValueError, match="headroom"):
        pool.consolidate(headroom=-0.1)
    reserved = pool.consolidate(headroom=0.08)
    s = pool.stats()
    assert s.num_slabs == 1 and reserved == s.bytes_reserved >= warm.peak_bytes_in_use
    assert s.peak_bytes_reserved == reserved  # high-water marks reset
    r0 = s.reservations
    peak_req = _varlen_trace(pool, seed=1, steps=150, hints=True)
    s = pool.stats()
    assert s.reservations == r0 and s.misses == warm.misses, "the measured pass reserved a new slab"
    assert s.peak_bytes_requested == peak_req
    assert s.peak_bytes_reserved / peak_req <= 1.1
    held = pool.acquire((16,), torch.float32)
    with pytest.raises(ValueError, match="1 are live"):
        pool.consolidate()
    pool.release(held)


def test_buffers_are_plain_tensors_not_autograd_views_of_the_slab():
    """An in-place op with a grad-requiring input on one buffer must not pull the slab (and so every
    other buffer carved from it) into the autograd graph."""
    pool = DeviceBufferPool("cpu", slab_bytes=8192)
    a = pool.acquire((4, 8), torch.float32)
    assert a._base is None and not a._is_view()
    x = torch.randn(4, 8, requires_grad=True)
    a.copy_(x * 2)
    a.sum().backward()
    assert torch.equal(x.grad, torch.full((4, 8), 2.0))
    b = pool.acquire((4, 8), torch.float32)
    assert not b.requires_grad and b.grad_fn is None
    pool.release(a)
    pool.release(b)
    # every acquire makes a new tensor object; the memory is reused at once
    c = pool.acquire((4, 8), torch.float32)
    assert c is not a and c.data_ptr() in (a.data_ptr(), b.data_ptr())
    pool.release(c)
    with pytest.raises(TypeError, match=r"4\.0"):  # equal-hashing float shape: rejected, nothing leaks
        pool.acquire((4.0, 8), torch.float32)
    s = pool.stats()
    assert s.live_blocks == 0 and s.bytes_in_use == 0 and s.acquires == s.releases
    assert pool.trim() == 8192


def test_stream_ops_note_stream_called_once_per_stream():
    class NotingStreams(FakeStreams):
        def __init__(self) -> None:
            super().__init__()
            self.noted: list[str] = []

        def note_stream(self, key) -> None:
            assert key == self.current, "note_stream must run while that stream is current"
            self.noted.append(key)

    streams = NotingStreams()
    pool = DeviceBufferPool("cpu", slab_bytes=4096, stream_ops=streams)
    for name in ("s0", "s1", "s0", "s1"):
        streams.current = name
        pool.release(pool.acquire((64,), torch.float32))
    assert streams.noted == ["s0", "s1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_keys_and_cross_stream_wait(pool_path):
    """On a GPU: both paths key free ranges by the same raw stream handle, reuse a block at once on
    the releasing stream, and never hand it to another stream while the releasing one is busy."""
    pool = DeviceBufferPool("cuda", slab_bytes=64 << 20)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(2048, 2048, device="cuda")
    with torch.cuda.stream(s1):
        buf = pool.acquire((2048, 2048), torch.float32, "cuda")
        for _ in range(50):  # keep s1 busy writing into buf
            torch.mm(a, a, out=buf)
        ptr = buf.data_ptr()
        pool.release(buf)
        assert s1.cuda_stream in pool._free  # the same key both paths use
        again = pool.acquire((2048, 2048), torch.float32)
        assert again.data_ptr() == ptr  # same stream: reused at once
        pool.release(again)
    with torch.cuda.stream(s2):
        busy = not s1.query()
        other = pool.acquire((2048, 2048), torch.float32, "cuda")
        if busy:
            assert other.data_ptr() != ptr
        pool.release(other)
    torch.cuda.synchronize()
    s = pool.stats()
    assert s.live_blocks == 0 and s.acquires == s.releases == 3
