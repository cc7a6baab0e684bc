"""The native hot path of DeviceBufferPool (csrc/pool_fast_path.cpp): built once, then loaded.

The extension is compiled on first use with ``torch.utils.cpp_extension`` (a C++17 compiler and
ninja are needed, as for any torch C++ extension; about 15 s once) into a cache folder named by
:func:`build_key`: a hash of what the binary depends on -- the source text, the torch version, the
CUDA version it is built against, the Python ABI (extension suffix) and the compiler flags -- and
of nothing that varies between virtual environments. A completed build found under its key is
loaded directly, so every venv with the same torch and Python reuses one build, and an upgraded
torch never loads a stale one. With a CUDA build of torch and the CUDA headers present it is
built against c10_cuda, so the current stream and device are read in C++; otherwise it is built
without CUDA and asks torch from Python for them. Where it cannot be built, :func:`load` says why
and pools run their pure-Python path, which has the same behaviour (tests run both).

Environment:
    MEMORY_RUNTIME_NATIVE=0        never build or load it (pools use the Python path)
    MEMORY_RUNTIME_CACHE=<folder>  where builds go (default: ~/.cache/memory_runtime)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build_key", "load", "native_status"]

SOURCE = Path(__file__).with_name("csrc") / "pool_fast_path.cpp"
# The source names its init function after TORCH_EXTENSION_NAME, which cpp_extension defines as
# the name given to load(): each variant has a name of its own (torch renames a second load() of
# one name with other flags in the same process to name_v1, which would not match the binary).
MODULE_PREFIX = "memory_runtime_native"
BASE_CFLAGS = ("-O2", "-std=c++17")
# Written last into a build folder: its presence means the binary beside it is complete.
COMPLETE_MARKER = "build-complete.json"

_lock = threading.Lock()
_state: tuple[ModuleType | None, str] | None = None


def _cache_root() -> Path:
    env = os.environ.get("MEMORY_RUNTIME_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memory_runtime"


def variant_cflags(with_cuda: bool) -> list[str]:
    """Compiler flags of one build variant."""
    return [*BASE_CFLAGS, *(["-DMEMORY_RUNTIME_WITH_CUDA"] if with_cuda else [])]


def build_inputs(source: bytes, with_cuda: bool) -> dict[str, object]:
    """Everything the built binary depends on, and nothing that differs between venvs (paths).

    The C++ compiler is left out: any compiler that builds the source makes a binary that works
    with this torch and Python.
    """
    return {
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "python_abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        "cflags": variant_cflags(with_cuda),
    }


def build_key(source: bytes, with_cuda: bool) -> str:
    """The cache folder name of a build of ``source``: readable prefix + hash of :func:`build_inputs`."""
    inputs = build_inputs(source, with_cuda)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest}"
    return tag.replace("+", "_")


def module_name(with_cuda: bool) -> str:
    """The extension's module name in one build variant."""
    return f"{MODULE_PREFIX}_{'cuda' if with_cuda else 'cpu'}"


def _load_built(build_dir: Path, name: str, lib_ext: str) -> ModuleType | None:
    """The extension from a completed build folder, or None if there is none (or it will not load)."""
    library = build_dir / f"{name}{lib_ext}"
    if not (build_dir / COMPLETE_MARKER).is_file() or not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # e.g. a build from a torch that reports the same version: build again
        return None
    return module


def _mark_complete(build_dir: Path, inputs: dict[str, object]) -> None:
    tmp = build_dir / f"{COMPLETE_MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(inputs, sort_keys=True, indent=1))
    os.replace(tmp, build_dir / COMPLETE_MARKER)  # atomic: readers see no marker or a whole one


def _build() -> tuple[ModuleType | None, str]:
    if os.environ.get("MEMORY_RUNTIME_NATIVE", "1") == "0":
        return None, "disabled by MEMORY_RUNTIME_NATIVE=0"
    if not SOURCE.is_file():
        return None, f"source {SOURCE} is missing from this installation"
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - part of every torch
        return None, f"torch.utils.cpp_extension unavailable: {exc}"
    lib_ext = getattr(cpp_extension, "LIB_EXT", ".so")
    source = SOURCE.read_bytes()
    variants = (True, False) if _cuda_headers(cpp_extension) else (False,)
    # A completed build is used as found (a CPU build, made where the CUDA one failed, included:
    # delete the cache folder to try the CUDA build again).
    for with_cuda in variants:
        build_dir = _cache_root() / build_key(source, with_cuda)
        module = _load_built(build_dir, module_name(with_cuda), lib_ext)
        if module is not None:
            return module, f"loaded from {build_dir}"
    # Why not let cpp_extension.load() decide: it writes build.ninja anew on every call, with the
    # venv's include directories and the source's path in each compile command, and ninja
    # rebuilds whenever a command changed -- so a build made from one venv was rebuilt by the next
    # (15-19 s). A completed build is therefore loaded above without calling it.
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja); torch needs it to build C++ extensions"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++)"
    failures = []
    for with_cuda in variants:
        build_dir = _cache_root() / build_key(source, with_cuda)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            # Compile a copy of exactly the bytes the key hashed (not the installed file, which
            # may change meanwhile and whose path differs between venvs).
            copy = build_dir / SOURCE.name
            copy.write_bytes(source)
            module = cpp_extension.load(
                name=module_name(with_cuda),
                sources=[str(copy)],
                extra_cflags=variant_cflags(with_cuda),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=False,
            )
            _mark_complete(build_dir, build_inputs(source, with_cuda))
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
