"""Puts this directory (shared model helpers, the ring checks) and the repository's integration_tests/
(the gloo process harness) on sys.path; spawned ranks inherit it."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parents[2] / "integration_tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
