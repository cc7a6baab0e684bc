"""Smoke test of the installed umbrella package: create_dilated_attention forward vs the reference.

Run in an environment with the umbrella and its siblings installed (``nox -s build`` does);
exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    import dilated_attention_pytorch as dap
    from attn_core import reference

    missing = [name for name, ok in dap.available_packages().items() if not ok]
    module = dap.create_dilated_attention([4, 8], [1, 2])  # kind="auto": single device here
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 4, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out = module(q, k, v, is_causal=True)
    expected, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)
    try:
        torch.testing.assert_close(out, expected)
    except AssertionError as exc:
        print(f"umbrella smoke FAILED: create_dilated_attention's module differs from the reference: {exc}")
        return 1
    if missing:
        print(f"umbrella smoke FAILED: packages the wheel set should provide are not importable: {missing}")
        return 1
    print(f"umbrella smoke ok: {type(module).__name__} forward == reference; packages: {dap.available_packages()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
