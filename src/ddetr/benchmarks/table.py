"""The plain-text table the benchmarks print: left-aligned columns, a rule under the header."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """``header`` and ``rows`` as aligned text, columns two spaces apart, each cell ``str()``-ed."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
