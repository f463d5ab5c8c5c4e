"""Formatting of the printed results: times in milliseconds and markdown
tables."""

from __future__ import annotations


def fmt_ms(t):
    return "-" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"
                                  if t < 1 else f"{t * 1e3:.0f}")


def markdown_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    align = ["---"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join(a.rjust(w, "-") if a.startswith("-") and a.endswith(":")
                               else a.ljust(w, "-") for a, w in zip(align, widths)) + " |"]
    for r in rows:
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in
                                                 zip(r[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
