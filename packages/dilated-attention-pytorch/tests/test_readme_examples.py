"""Every README example marked ``# runs on CPU`` runs, each in a fresh interpreter (run with [all]).

The examples are the python code blocks of the repository's package READMEs whose first line is
``# runs on CPU``; blocks that need a CUDA GPU are not marked. Each runs in its own process, in an
empty working folder, and must exit 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

MARKER = "# runs on CPU"
PACKAGES_DIR = Path(__file__).resolve().parents[2]
READMES = sorted(PACKAGES_DIR.glob("*/README.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for readme in READMES:
        blocks = [b for b in BLOCK.findall(readme.read_text()) if b.startswith(MARKER)]
        found += [(f"{readme.parent.name}-{i}", code) for i, code in enumerate(blocks)]
    return found


EXAMPLES = _examples()


def test_every_package_readme_has_a_cpu_example() -> None:
    if not READMES:
        pytest.skip(f"package READMEs not found under {PACKAGES_DIR} (tests run outside the repository)")
    names = {name.rsplit("-", 1)[0] for name, _ in EXAMPLES}
    assert names == {p.parent.name for p in READMES}


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_readme_example_runs(name: str, code: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"README example {name} failed:\n{proc.stdout}\n{proc.stderr}"
