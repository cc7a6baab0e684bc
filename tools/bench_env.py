"""What the GPU benchmarks share: the source revision and environment recorded in their JSON, and
the CUDA-event timer.

The GPU machines run a copy of the working tree whose .git may be stale, so the command that
launches a benchmark there passes the revision measured: BENCH_SOURCE_REV="$(git describe --always
--dirty)" computed where the tree was copied from. Without it, ``git describe`` of the tree runs here.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable


def cuda_median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median ms of fn() over ``reps`` runs after ``warmup`` untimed ones, each timed with CUDA events."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def source_revision() -> str | None:
    """BENCH_SOURCE_REV if set, else ``git describe --always --dirty`` (None outside a git checkout)."""
    given = os.environ.get("BENCH_SOURCE_REV", "").strip()
    if given:
        return given
    try:
        # "-dirty": the tree measured differs from that commit
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def gpu_env(**extra: object) -> dict:
    """The JSON "env" of a GPU benchmark: GPU name, torch / triton / CUDA / Python versions and the
    source revision (:func:`source_revision`), plus the benchmark's own settings in ``extra``."""
    import platform

    import torch
    import triton

    env: dict = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )
    env.update(extra)
    env["git_commit"] = source_revision()
    return env


def gpu_tag(name: str) -> str:
    """Short lower-case tag of a GPU name for report file names: 'NVIDIA H200' -> 'h200',
    'NVIDIA H100 80GB HBM3' -> 'h100'; names without a known model give their first word after the vendor."""
    for model in ("H200", "H100", "B200", "GB200", "A100", "L40S", "L4"):
        if re.search(rf"\b{model}\b", name):
            return model.lower()
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w and w.upper() != "NVIDIA"]
    return words[0].lower() if words else "gpu"


class SMClockSampler:
    """Samples the GPU's SM clock (MHz, via NVML) on a background thread while timings run.

    The H100 moves its clock under power management by several percent over seconds, which is the
    main run-to-run spread of a single timing; the benchmarks record the mean clock beside each
    timing so a reader can tell a slow kernel from a slow clock. Without NVML (pynvml missing, no
    driver) every reading is None.
    """

    def __init__(self, device_index: int = 0, period_s: float = 0.02) -> None:
        import threading

        self._period = period_s
        self._lock = threading.Lock()
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # no NVML here: readings are None
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True) if self._handle is not None else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                mhz = int(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))
            except Exception:
                continue
            with self._lock:
                self._samples.append(mhz)

    def measure(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """(fn(*args, **kwargs), mean SM clock in MHz over the call or None)."""
        with self._lock:
            self._samples.clear()
        value = fn(*args, **kwargs)
        with self._lock:
            got = list(self._samples)
        return value, (sum(got) / len(got) if got else None)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
