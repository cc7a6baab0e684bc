"""Test helpers shared by every package's tests: the project's tolerance rule.

A low-precision result passes when its error against the float64 reference is at most
``factor`` (2) times the error of a plain PyTorch computation in the same dtype against that
reference. NaN never passes. A small floor (a few ulps of the reference's magnitude) keeps the
rule meaningful when the baseline happens to be exact.

float32 gets a floor of 32 ulps instead of 8: its results come from several float32 reductions
(per-group or per-tile partial sums merged by their LSE, gradients added piece by piece) where
the one-pass baseline has one, and the baseline's own error moves with the CPU's kernels (a
fixed-seed demo check measured 9.6 ulps on one host and under 8 on others). 32 ulps is ~4e-6 of
the magnitude: real mistakes (a merge weight treated as constant, a missed key) are orders larger.
"""

from __future__ import annotations

import torch

__all__ = ["assert_close_to_reference", "max_abs_error", "tolerance"]

_FLOOR_ULPS = 8.0
_FLOOR_ULPS_FLOAT32 = 32.0


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |actual - reference| in float64; inf if actual has a NaN/inf where the reference is finite."""
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    if a.shape != r.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs reference {tuple(r.shape)}")
    if a.numel() == 0:
        return 0.0
    if torch.isnan(a).any():
        return float("inf")
    finite = torch.isfinite(r)
    if (~torch.isfinite(a) & finite).any() or (a[~finite] != r[~finite]).any():
        return float("inf")
    return float((a[finite] - r[finite]).abs().max()) if finite.any() else 0.0


def tolerance(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
) -> float:
    """The largest max-abs error ``actual`` may have against ``reference`` under the project's rule.

    max(factor x the baseline's error, a floor of a few ulps of ``actual``'s dtype at the reference's
    magnitude); for float64 without a baseline, a float64 rounding budget.
    """
    mag = float(reference.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if reference.numel() else 0.0
    dtype = actual.dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    ulps = _FLOOR_ULPS_FLOAT32 if dtype == torch.float32 else _FLOOR_ULPS
    floor = ulps * eps * max(mag, 1.0)
    if dtype == torch.float64 and baseline is None:
        # float64 vs float64: differences are rounding only; allow a generous ulp budget.
        floor = 1e4 * eps * max(mag, 1.0)
    base_err = max_abs_error(baseline, reference) if baseline is not None else 0.0
    return max(factor * base_err, floor)


def assert_close_to_reference(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
) -> None:
    """Assert ``actual`` is within ``factor`` x the baseline's error (same dtype) of the float64 reference.

    baseline: the same quantity computed by plain PyTorch in ``actual``'s dtype; None for
    float64 inputs, where the tolerance is a few ulps of float64 scaled by the magnitude.
    """
    err = max_abs_error(actual, reference)
    tol = tolerance(actual, reference, baseline, factor=factor)
    if not (err <= tol):
        base_err = max_abs_error(baseline, reference) if baseline is not None else 0.0
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds {tol:.3e} "
            f"(= max({factor} x baseline error {base_err:.3e}, ulp floor); dtype {actual.dtype})"
        )
