"""Smoke test of the installed umbrella package: create_dilated_attention forward vs the reference.

    python smoke_dilated_attention_pytorch.py [MODULE ...]

MODULEs (e.g. attn_sparse attn_ring memory_runtime) must be installed and re-exported; run with
none for the umbrella alone. ``nox -s build`` runs both; exits non-zero saying what failed.
"""

from __future__ import annotations

import sys

import torch
from smoke_check import matches_reference


def main() -> int:
    import dilated_attention_pytorch as dap
    from attn_core import reference

    available = dap.available_packages()
    missing = [name for name in sys.argv[1:] if not available.get(name)]
    module = dap.create_dilated_attention([4, 8], [1, 2])  # kind="auto": single device here
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 4, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out = module(q, k, v, is_causal=True)
    expected, _ = reference.dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)
    if not matches_reference("umbrella smoke FAILED: create_dilated_attention's module", out, expected):
        return 1
    if missing:
        print(f"umbrella smoke FAILED: packages the wheel set should provide are not available: {missing}")
        return 1
    print(f"umbrella smoke ok: {type(module).__name__} forward == reference; packages: {available}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
