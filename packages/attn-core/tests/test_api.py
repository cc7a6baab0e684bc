"""Backend selection of attn_core.dilated_attention: explain(), pinning, "auto", last_backend()."""

from __future__ import annotations

import threading
import types

import pytest
import torch

import attn_core
from attn_core import BACKENDS, BackendChoice, dilated_attention, explain, last_backend, reference
from attn_core import api as api_mod
from attn_core.testing import assert_close_to_reference


def _qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 10, 4, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 10, 2, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 10, 2, 8, generator=g, dtype=dtype)
    return q, k, v


def test_public_names():
    for name in (
        "dilated_attention",
        "explain",
        "DilatedAttention",
        "MultiheadDilatedAttention",
        "LongNetEncoderLayer",
        "LongNetDecoderLayer",
        "LongNetLM",
        "BACKENDS",
    ):
        assert hasattr(attn_core, name), name
        assert name in attn_core.__all__
    assert "reference" in BACKENDS


def test_explain_reports_choice_and_every_other_backend():
    q, k, v = _qkv()
    choice = explain(q, k, v, [4, 8], [1, 2], is_causal=True)
    assert isinstance(choice, BackendChoice)
    assert choice.backend in BACKENDS
    assert set(choice.rejected) == set(BACKENDS) - {choice.backend}
    text = str(choice)
    assert text.startswith(f"backend: {choice.backend} (")
    for name in choice.rejected:
        assert f"not {name}:" in text
    # the auto order is honoured: every backend ahead of the chosen one states a reason
    ahead = api_mod.AUTO_ORDER[: api_mod.AUTO_ORDER.index(choice.backend)]
    for name in ahead:
        assert choice.rejected[name], f"{name} is ahead of {choice.backend} in the auto order but gave no reason"


def test_explain_says_how_the_sdpa_backend_runs_the_call(monkeypatch):
    from attn_core import gathered_groups

    q, k, v = (t.float() for t in _qkv())
    small = explain(q, k, v, [4, 8], [1, 2], backend="sdpa")
    assert small.execution.startswith("gathered (")
    assert "runs as: gathered" in str(small)
    monkeypatch.setattr(gathered_groups, "GATHER_MAX_ELEMS", 0)
    assert explain(q, k, v, [4, 8], [1, 2], backend="sdpa").execution.startswith("strided (")
    packed = explain(
        q[:1], k[:1], v[:1], [4, 8], [1, 2], backend="sdpa", cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32)
    )
    assert packed.execution.startswith("packed (")
    assert explain(q, k, v, [4, 8], [1, 2], backend="reference").execution == ""


def test_auto_runs_what_explain_says_and_is_correct():
    q, k, v = _qkv()
    expected = explain(q, k, v, [4, 8], [1, 2]).backend
    out = dilated_attention(q, k, v, [4, 8], [1, 2])
    assert last_backend() == expected
    ref, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2])
    assert_close_to_reference("auto out", out, ref)


def test_pinned_reference_and_last_backend_is_per_thread():
    q, k, v = _qkv()
    dilated_attention(q, k, v, [4], [1], backend="reference")
    assert last_backend() == "reference"
    seen: list[str | None] = []
    t = threading.Thread(target=lambda: seen.append(last_backend()))
    t.start()
    t.join()
    assert seen == [None], "another thread must not see this thread's last backend"


def test_pinned_reference_explained_as_pinned():
    q, k, v = _qkv()
    choice = explain(q, k, v, [4], [1], backend="reference")
    assert choice.backend == "reference"
    assert "pinned" in choice.why


def test_missing_backend_reports_not_installed(monkeypatch):
    monkeypatch.setattr(api_mod.REGISTRY, "order", (*api_mod.REGISTRY.order, "nonexistent_backend"))
    q, k, v = _qkv()
    choice = explain(q, k, v, [4], [1])
    assert choice.rejected["nonexistent_backend"] == (
        "not installed (no module attn_core.backends.nonexistent_backend)",
    )
    with pytest.raises(ValueError, match=r"backend 'nonexistent_backend' cannot take this input: not installed"):
        dilated_attention(q, k, v, [4], [1], backend="nonexistent_backend")


def _fake_backend(reasons: list[str]) -> types.ModuleType:
    mod = types.ModuleType("fake")
    mod.NAME = "fake"  # type: ignore[attr-defined]
    mod.unsupported_reasons = lambda call: list(reasons)  # type: ignore[attr-defined]

    def run(call):
        return torch.full_like(call.q, 7.0)

    mod.dilated_attention = run  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake_backend(monkeypatch):
    """Install a backend named "fake" first in the auto order; returns a setter for its reasons."""
    reasons: list[str] = []
    monkeypatch.setitem(api_mod.REGISTRY._modules, "fake", _fake_backend(reasons))
    monkeypatch.setattr(api_mod.REGISTRY, "order", ("fake", *api_mod.REGISTRY.order))
    return reasons


def test_pinned_backend_that_cannot_take_input_raises_with_reasons(fake_backend):
    fake_backend.extend(["needs CUDA tensors, got cpu", "needs fp16/bf16, got torch.float64"])
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match=r"backend 'fake' cannot take this input: needs CUDA tensors, got cpu; needs fp16"
    ):
        dilated_attention(q, k, v, [4], [1], backend="fake")
    # auto skips it and says why
    choice = explain(q, k, v, [4], [1])
    assert choice.backend != "fake"
    assert choice.rejected["fake"] == ("needs CUDA tensors, got cpu", "needs fp16/bf16, got torch.float64")
    assert "skipped fake: needs CUDA tensors, got cpu; needs fp16/bf16" in choice.why
    out = dilated_attention(q, k, v, [4], [1])
    assert last_backend() == choice.backend
    assert not torch.all(out == 7.0)


def test_auto_takes_first_backend_that_accepts(fake_backend):
    q, k, v = _qkv()
    choice = explain(q, k, v, [4], [1])
    assert choice.backend == "fake"
    assert "first backend in the auto order" in choice.why
    assert choice.rejected["reference"] == ()
    assert "lower in the auto order" in str(choice)
    out = dilated_attention(q, k, v, [4], [1])
    assert last_backend() == "fake" and torch.all(out == 7.0)


def test_explain_runs_nothing():
    q, k, v = _qkv()
    dilated_attention(q, k, v, [4], [1], backend="reference")
    before = last_backend()
    explain(q, k, v, [4], [1], backend="reference")
    assert last_backend() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_dtype_and_softmax_scale_is_used(dtype):
    q, k, v = _qkv(dtype)
    out = dilated_attention(q, k, v, [4, 8], [1, 2], softmax_scale=0.2, backend="reference")
    assert out.dtype == dtype
    ref, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2], softmax_scale=0.2)
    base = (
        None
        if dtype == torch.float64
        else reference.dilated_attention(q, k, v, [4, 8], [1, 2], softmax_scale=0.2, dtype=dtype)[0]
    )
    assert_close_to_reference("scaled out", out, ref, base)
    default, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2])
    assert not torch.allclose(out.double(), default, atol=1e-3), "softmax_scale had no effect"


def test_config_accepts_integer_arrays_and_ranges():
    import numpy as np

    q, k, v = _qkv()
    a = dilated_attention(q, k, v, [4, 8], [1, 2], backend="reference")
    b = dilated_attention(q, k, v, np.array([4, 8]), torch.tensor([1, 2]), backend="reference")
    c = dilated_attention(q, k, v, range(4, 12, 4), (1, 2), backend="reference")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_explain_report_gives_each_reason_once(fake_backend):
    fake_backend.extend(["needs CUDA tensors, got cpu", "needs fp16/bf16, got torch.float64"])
    q, k, v = _qkv()
    text = str(explain(q, k, v, [4], [1]))
    for reason in fake_backend:
        assert text.count(reason) == 1, text
