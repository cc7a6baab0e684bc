"""Smoke test of an installed memory-runtime: a CPU pool round trip and a fragmentation report.

Run in an environment with only memory-runtime's declared dependencies (``nox -s build`` does);
exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from memory_runtime import DeviceBufferPool, FragmentationReport

    pool = DeviceBufferPool("cpu", slab_bytes=1 << 20)
    problems = []
    a = pool.acquire((64, 32), torch.float32)
    a.fill_(3.0)
    first_ptr = a.data_ptr()
    pool.release(a)
    again = pool.acquire((64, 32), torch.float32)  # same size class, same stream: the freed block
    if again.shape != (64, 32) or again.dtype != torch.float32:
        problems.append(f"acquire returned {tuple(again.shape)} {again.dtype}")
    if again.data_ptr() != first_ptr:
        problems.append("a released block was not reused by the next same-sized acquire")
    kept = pool.acquire((16,), torch.float64, long_lived=True)
    pool.release(again)
    pool.release(kept)
    try:
        pool.release(kept)
        problems.append("a double release did not raise")
    except ValueError:
        pass
    stats = pool.stats()
    if stats.live_blocks or stats.bytes_in_use or stats.reservations != 1 or stats.hits < 1:
        problems.append(f"unexpected pool state after the round trip: {stats}")
    report = FragmentationReport.from_stats(pool.memory_stats(), pool.memory_snapshot(), device="cpu")
    if problems:
        print("memory-runtime smoke FAILED: " + "; ".join(problems))
        return 1
    print(f"memory-runtime smoke ok: pool round trip ({stats}); report: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
