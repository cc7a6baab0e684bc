"""The native hot path of DeviceBufferPool (csrc/pool_fast_path.cpp): built once, then loaded.

The extension is compiled on first use with ``torch.utils.cpp_extension`` (a C++17 compiler and
ninja are needed, as for any torch C++ extension; about 15 s once) into a cache folder keyed by
the Python and torch versions and the source's hash, so an upgraded torch never loads a stale
build. With a CUDA build of torch and the CUDA headers present it is built against c10_cuda, so
the current stream and device are read in C++; otherwise it is built without CUDA and asks torch
from Python for them. Where it cannot be built, :func:`load` says why and pools run their pure-Python path, which
has the same behaviour (tests run both).

Environment:
    MEMORY_RUNTIME_NATIVE=0        never build or load it (pools use the Python path)
    MEMORY_RUNTIME_CACHE=<folder>  where builds go (default: ~/.cache/memory_runtime)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["load", "native_status"]

SOURCE = Path(__file__).with_name("csrc") / "pool_fast_path.cpp"
# The module name is fixed by the source's PyInit_ function.
MODULE_NAME = "memory_runtime_native"

_lock = threading.Lock()
_state: tuple[ModuleType | None, str] | None = None


def _cache_root() -> Path:
    env = os.environ.get("MEMORY_RUNTIME_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memory_runtime"


def _build() -> tuple[ModuleType | None, str]:
    if os.environ.get("MEMORY_RUNTIME_NATIVE", "1") == "0":
        return None, "disabled by MEMORY_RUNTIME_NATIVE=0"
    if not SOURCE.is_file():
        return None, f"source {SOURCE} is missing from this installation"
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - part of every torch
        return None, f"torch.utils.cpp_extension unavailable: {exc}"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja); torch needs it to build C++ extensions"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++)"
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{digest}".replace("+", "_")
    failures = []
    for with_cuda in (True, False) if _cuda_headers(cpp_extension) else (False,):
        build_dir = _cache_root() / (tag + ("-cuda" if with_cuda else "-cpu"))
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name=MODULE_NAME,
                sources=[str(SOURCE)],
                extra_cflags=["-O2", "-std=c++17"] + (["-DMEMORY_RUNTIME_WITH_CUDA"] if with_cuda else []),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=False,
            )
        except Exception as exc:  # a compiler or linker failure: report it, try the next variant
            text = str(exc).strip().splitlines()
            failures.append(f"build failed in {build_dir}: {' | '.join(text[-6:])}")
            continue
        note = f" (after: {failures[0]})" if failures else ""
        return module, f"built in {build_dir}{note}"
    return None, "; ".join(failures)


def _cuda_headers(cpp_extension: ModuleType) -> bool:
    """A CUDA build of torch with the CUDA toolkit's headers (c10/cuda includes cuda_runtime_api.h)."""
    home = getattr(cpp_extension, "CUDA_HOME", None)
    return bool(torch.version.cuda) and home is not None and (Path(home) / "include" / "cuda_runtime_api.h").is_file()


def load() -> tuple[ModuleType | None, str]:
    """(module, reason): the extension module, or None and why it is not available. Built at most once per process."""
    global _state
    with _lock:
        if _state is None:
            _state = _build()
        return _state


def native_status() -> dict[str, object]:
    """Whether DeviceBufferPool's native hot path is in use here, and why (builds it if needed)."""
    module, reason = load()
    return {"available": module is not None, "reason": reason}
