"""``python -m bench NAME [args]``: run one benchmark of the suite; ``--list`` names them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_NOT_BENCHMARKS = {"__init__", "__main__", "common"}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in _NOT_BENCHMARKS)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: python -m bench NAME [args]\nbenchmarks: " + ", ".join(names()))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names():
        print(f"bench: unknown benchmark {name!r} (one of: {', '.join(names())})", file=sys.stderr)
        return 2
    sys.argv = [f"python -m bench {name}", *rest]
    return int(importlib.import_module(f"bench.{name}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
