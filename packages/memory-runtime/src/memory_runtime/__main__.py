"""``python -m memory_runtime monitor ...`` (see memory_runtime.monitor for the options and JSON schema)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m memory_runtime monitor [--once] [--json] [--interval S] [--duration S] [--plot out.png]"
        )
        return 0 if argv else 2
    if argv[0] != "monitor":
        print(f"unknown command {argv[0]!r}; available: monitor", file=sys.stderr)
        return 2
    from .monitor import main as monitor_main

    return monitor_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
