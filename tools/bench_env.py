"""Source revision recorded by the benchmarks in their JSON.

The GPU machines run a copy of the working tree whose .git may be stale, so the command that
launches a benchmark there passes the revision measured: BENCH_SOURCE_REV="$(git describe --always
--dirty)" computed where the tree was copied from. Without it, ``git describe`` of the tree runs here.
"""

from __future__ import annotations

import os
import subprocess


def source_revision() -> str | None:
    """BENCH_SOURCE_REV if set, else ``git describe --always --dirty`` (None outside a git checkout)."""
    given = os.environ.get("BENCH_SOURCE_REV", "").strip()
    if given:
        return given
    try:
        # "-dirty": the tree measured differs from that commit
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None
