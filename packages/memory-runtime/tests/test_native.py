"""The native extension's build cache: keyed on what the binary depends on, never on venv paths."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from memory_runtime import _native

SOURCE = _native.SOURCE.read_bytes()


def test_build_key_ignores_venv_paths(monkeypatch):
    before = {flag: _native.build_key(SOURCE, flag) for flag in (False, True)}
    monkeypatch.setattr(sys, "prefix", "/elsewhere/venv2")
    monkeypatch.setattr(sys, "exec_prefix", "/elsewhere/venv2")
    monkeypatch.setenv("VIRTUAL_ENV", "/elsewhere/venv2")
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/elsewhere/venv2/include"])
    monkeypatch.setattr(_native, "SOURCE", _native.SOURCE.with_name("moved.cpp"))
    assert {flag: _native.build_key(SOURCE, flag) for flag in (False, True)} == before
    assert before[False] != before[True]


def test_build_key_changes_with_what_the_binary_depends_on(monkeypatch):
    key = _native.build_key(SOURCE, False)
    assert _native.build_key(SOURCE + b"\n// edited\n", False) != key
    assert _native.build_key(SOURCE, False) == key
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    assert _native.build_key(SOURCE, False) != key
    monkeypatch.undo()
    monkeypatch.setattr(_native, "BASE_CFLAGS", ("-O3", "-std=c++17"))
    assert _native.build_key(SOURCE, False) != key


def test_completed_build_is_loaded_without_the_build_tool(monkeypatch):
    """A second process (or venv) finds the completed build under its key and loads it: torch's
    build step (which rebuilds when the venv's include paths differ) is not called."""
    module, reason = _native.load()
    if module is None:
        if os.environ.get("MEMORY_RUNTIME_REQUIRE_NATIVE") == "1":
            pytest.fail(f"MEMORY_RUNTIME_REQUIRE_NATIVE=1 but the native hot path is unavailable: {reason}")
        pytest.skip(f"native hot path unavailable here: {reason}")

    def no_build(*args, **kwargs):
        raise AssertionError("cpp_extension.load called although a completed build exists")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    again, why = _native._build()
    assert again is not None and why.startswith("loaded from"), why
    assert again.RangeAllocator is not None


def test_build_variants_have_distinct_names_and_mark_completion(monkeypatch, tmp_path):
    """If the CUDA variant fails to build, the CPU variant is built under a name of its own (torch
    renames a second build of one name in a process to name_v1, which the binary would not export)."""
    monkeypatch.setenv("MEMORY_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_cuda_headers", lambda ext: True)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH passes the compiler check
    calls: list[tuple[str, bool]] = []
    built = types.ModuleType("fake")

    def fake_load(*, name, with_cuda, build_directory, sources, **kwargs):
        calls.append((name, with_cuda))
        # compiled: a copy of the very bytes the key hashed, inside the keyed folder
        assert [Path(s).read_bytes() for s in sources] == [SOURCE]
        assert Path(sources[0]).parent == Path(build_directory)
        if with_cuda:
            raise RuntimeError("nvcc: not found")
        return built

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    module, reason = _native._build()
    assert module is built and "nvcc: not found" in reason
    assert [flag for _, flag in calls] == [True, False] and calls[0][0] != calls[1][0]
    cpu_dir = tmp_path / _native.build_key(SOURCE, False)
    marker = json.loads((cpu_dir / _native.COMPLETE_MARKER).read_text())
    assert marker == json.loads(json.dumps(_native.build_inputs(SOURCE, False)))
    assert not (tmp_path / _native.build_key(SOURCE, True) / _native.COMPLETE_MARKER).exists()
