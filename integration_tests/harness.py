"""Run a function in real processes joined by a torch.distributed process group.

    results = run_world(checks_ring.check_forward, world_size=3, timeout=120.0)
    assert_all_ok(results)

Each rank is a spawned process (no fork: torch's threads do not survive it) that joins a gloo group
through a fresh TCP store, calls ``fn(rank, world_size, *args)`` and reports its return value or
its exception. The parent waits at most ``timeout`` seconds, then kills every rank and raises: a
hung collective fails the test instead of hanging CI. Check functions must live in importable
modules (``checks_*.py`` here), not in test files, so the spawned children can import them.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""  # message + traceback


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, pg_timeout_s: float, fn: Callable[..., Any], args: tuple, out: Any
) -> None:
    torch.set_num_threads(1)  # CI has 2 cores shared by all ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        out.put(RankResult(rank, True, value))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        out.put(RankResult(rank, False, None, type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    pg_timeout_s: float = 60.0,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results sorted by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout_s, fn, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            res = out.get(timeout=min(remaining, 1.0))
            results[res.rank] = res
        except queue.Empty:
            # A rank that died without reporting (segfault, os._exit) is recorded as failed.
            for r, p in enumerate(procs):
                if r not in results and p.exitcode is not None and p.exitcode != 0:
                    results[r] = RankResult(r, False, None, "ProcessExit", f"exit code {p.exitcode}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
    return [results[r] for r in range(world_size)]


def assert_all_ok(results: list[RankResult]) -> list[Any]:
    """Raise with every failing rank's traceback; otherwise return the ranks' values."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise AssertionError("\n\n".join(f"rank {r.rank}: {r.error_type}: {r.error}" for r in bad))
    return [r.value for r in results]


def rank_device() -> torch.device:
    """This rank's device: the current CUDA device under NCCL (run_nccl.py sets it), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def expect_value_error(fn: Callable[[], Any], needle: str) -> None:
    """Call fn and require a ValueError whose message contains ``needle``."""
    try:
        fn()
    except ValueError as exc:
        if needle not in str(exc):
            raise AssertionError(f"ValueError without {needle!r}: {exc}") from exc
        return
    raise AssertionError(f"expected ValueError mentioning {needle!r}")
