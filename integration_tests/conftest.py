"""Puts integration_tests/ on sys.path so tests import the harness and the check modules by plain
name (spawned worker processes import them the same way)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
