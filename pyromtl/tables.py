"""The one table renderer: aligned markdown tables that read well in a terminal too."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any


def width(text: str) -> int:
    """Display width of ``text`` in a monospaced font (combining marks such as η̂'s take none)."""
    return sum(0 if unicodedata.combining(ch) else 1 for ch in text)


def fmt(value: Any, missing: str = "-") -> str:
    """A metric value with 4 decimals; ``nan`` for NaN, ``missing`` for anything not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return "nan" if math.isnan(v) else f"{v:.4f}"


def render(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table, padded to align: the first ``left`` columns left-aligned, the others right."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(width(r[i]) for r in [list(header), *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pads = [" " * (w - width(c)) for c, w in zip(cells, widths)]
        return "| " + " | ".join(c + p if i < left else p + c for i, (c, p) in enumerate(zip(cells, pads))) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def metrics_table(tasks: Mapping[str, Mapping[str, float]], average: Mapping[str, float]) -> str:
    """Tasks as rows and metric keys (in first-seen order) as columns, then the average."""
    keys: list[str] = []
    for m in [*tasks.values(), average]:
        keys += [k for k in m if k not in keys]

    def cells(m: Mapping[str, float]) -> list[str]:
        return [fmt(m[k]) if k in m else "-" for k in keys]

    rows = [[name, *cells(m)] for name, m in tasks.items()]
    rows.append(["average", *cells(average)])
    return render(["task", *keys], rows)
