"""How the report writes numbers and tables (also used by the export cards)."""

from __future__ import annotations

from typing import Any


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def pct_interval(interval: list[float] | tuple[float, float] | None) -> str:
    if not interval:
        return ""
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pp"


def pp_interval(interval: list[float] | None) -> str:
    if not interval:
        return ""
    return f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def fmt_num(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return ", ".join(str(v) for v in x)
    return str(x)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out
