"""Plain-text tables for readable summaries."""

from __future__ import annotations

from typing import Any, Sequence


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(2, digits - 2)}f}"
    return str(v)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str | None = None) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    out = ([title] if title else []) + [line, sep] + body
    return "\n".join(out)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("%x"))
        return True
    except ValueError:
        return False


def format_kv(rows: Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column key/value block."""
    w = max((len(k) for k, _ in rows), default=0)
    out = [title] if title else []
    out += [f"{k.ljust(w)}  {fmt(v)}" for k, v in rows]
    return "\n".join(out)
