"""The comparison every smoke script ends with: forward and gradients against the float64 reference.

Imported by the smoke scripts beside it (run as ``python tools/smoke/smoke_<package>.py``, so this
folder is on sys.path); needs only torch, like the clean environments they run in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def matches_reference(
    what: str,
    out: torch.Tensor,
    expected: torch.Tensor,
    grads: Sequence[torch.Tensor] = (),
    grads_ref: Sequence[torch.Tensor] = (),
) -> bool:
    """True when out (and dq, dk, dv) equal the reference within torch's default tolerance; else print why."""
    try:
        torch.testing.assert_close(out, expected)
        for name, got, ref in zip("qkv", grads, grads_ref):
            torch.testing.assert_close(got, ref, msg=lambda m, n=name: f"d{n}: {m}")
    except AssertionError as exc:
        print(f"{what} differs from the reference: {exc}")
        return False
    return True
