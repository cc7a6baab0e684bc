"""BackendRegistry: lazy loading, pinning without fallback, and asking only what a decision needs."""

from __future__ import annotations

import types

import pytest

from attn_core.registry import BackendRegistry


def _registry_with(reasons: dict[str, list[str]]) -> tuple[BackendRegistry, list[str]]:
    reg = BackendRegistry("attn_core", tuple(reasons))
    asked: list[str] = []
    for name, why in reasons.items():
        mod = types.ModuleType(name)
        mod.unsupported_reasons = lambda name=name, why=why: (asked.append(name), why)[1]  # type: ignore[attr-defined]
        reg._modules[name] = mod
    return reg, asked


def test_dispatch_asks_only_up_to_the_first_accepting_backend() -> None:
    reg, asked = _registry_with({"fast": ["needs CUDA"], "mid": [], "slow": []})
    choice = reg.choose("auto", lambda mod: mod.unsupported_reasons())
    assert choice.backend == "mid"
    assert asked == ["fast", "mid"]
    assert choice.rejected == {"fast": ("needs CUDA",)}
    assert "skipped fast: needs CUDA" in choice.why


def test_explain_asks_every_backend() -> None:
    reg, asked = _registry_with({"fast": ["needs CUDA"], "mid": [], "slow": []})
    choice = reg.choose("auto", lambda mod: mod.unsupported_reasons(), explain_all=True)
    assert sorted(asked) == ["fast", "mid", "slow"]
    assert choice.rejected == {"fast": ("needs CUDA",), "slow": ()}
    assert "lower in the auto order" in str(choice)


def test_pinned_backend_is_the_only_one_asked_and_never_falls_back() -> None:
    reg, asked = _registry_with({"fast": ["needs CUDA"], "slow": []})
    assert reg.choose("slow", lambda mod: mod.unsupported_reasons()).backend == "slow"
    assert asked == ["slow"]
    with pytest.raises(ValueError, match="backend 'fast' cannot take this input: needs CUDA"):
        reg.choose("fast", lambda mod: mod.unsupported_reasons())


def test_bad_names_and_nothing_accepting() -> None:
    reg, _ = _registry_with({"a": ["no"], "b": ["never"]})
    with pytest.raises(TypeError, match="backend must be a str"):
        reg.choose(3, lambda mod: mod.unsupported_reasons())
    with pytest.raises(ValueError, match="unknown backend 'c'"):
        reg.choose("c", lambda mod: mod.unsupported_reasons())
    with pytest.raises(ValueError, match=r"no backend can take this input: a: no \| b: never"):
        reg.choose("auto", lambda mod: mod.unsupported_reasons())


def test_missing_module_is_reported_not_installed() -> None:
    reg = BackendRegistry("attn_core", ("does_not_exist",))
    assert reg.load("does_not_exist") is None
    assert reg.reasons("does_not_exist", lambda mod: []) == (
        "not installed (no module attn_core.backends.does_not_exist)",
    )
    assert reg.load("reference") is not None  # a real backend imports lazily
    reg.record("reference")
    assert reg.last() == "reference"


def test_report_gives_each_reason_once() -> None:
    reg, _ = _registry_with({"fast": ["needs CUDA"], "mid": ["needs fp16"], "slow": [], "last": []})
    for explain_all in (False, True):
        choice = reg.choose("auto", lambda mod: mod.unsupported_reasons(), explain_all=explain_all)
        text = str(choice)
        assert choice.backend == "slow"
        assert text.count("needs CUDA") == 1 and text.count("needs fp16") == 1, text
        assert "not fast: needs CUDA" in text and "not mid: needs fp16" in text
        assert "skipped fast: needs CUDA | mid: needs fp16" in choice.why  # the one-line summary keeps them
