"""Numbers, byte sizes and plain-text tables for people: the one place they are formatted."""

from __future__ import annotations


def fmt(x: float) -> str:
    """Three significant digits: 3.14159e-05 -> '3.14e-05'."""
    return f"{x:.3g}"


def fmt_bytes(n: int) -> str:
    """1536 -> '1.5 KB'."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns aligned with two spaces; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [f"{str(c):<{w}}" for c, w in zip(row, widths)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
