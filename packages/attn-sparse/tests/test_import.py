"""Importing attn_sparse stays light."""

from __future__ import annotations


def test_import_stays_light() -> None:
    # the api imports its backend modules (torch.compile cannot import them later), which must not
    # import triton or torch._dynamo: that would cost seconds and fix Triton's interpreter choice
    import subprocess
    import sys

    code = "import sys, attn_sparse; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
