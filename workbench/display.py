"""HTML building blocks for results that show themselves in Jupyter (``_repr_html_``).

Why one module: every result class composes the same few pieces (escaped text, tables, a figure
inlined as a base64 PNG, collapsible sections), so escaping is done in one place. Model output
is untrusted text: everything that is not markup built here goes through :func:`escape`.
Shared ground: imports no stage.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STYLE = ("font-family: system-ui, sans-serif; font-size: 13px; line-height: 1.35; "
         "border: 1px solid #ddd; border-radius: 4px; padding: 8px 12px; margin: 4px 0; overflow-x: auto")
CELL = "border: 1px solid #e3e3e3; padding: 3px 6px; text-align: left; vertical-align: top"


class HTML(str):
    """Markup built by this module: placed as it is, never escaped again (every other value is)."""

    def _repr_html_(self) -> str:
        return str(self)


def escape(value: Any) -> HTML:
    """Text as HTML text: ``<``, ``>``, ``&`` and quotes escaped."""
    return HTML(html.escape(str(value), quote=True))


def cell(value: Any, digits: int = 4) -> str:
    """A value as cell content: markup from here as it is, floats to ``digits`` places, ``None`` and NaN empty,
    anything else escaped."""
    if isinstance(value, HTML):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(value)


def text(value: Any) -> HTML:
    """A block of untrusted text (a prompt, a model answer), whitespace kept."""
    return HTML(f'<div style="white-space: pre-wrap; font-family: ui-monospace, monospace">{escape(value)}</div>')


def table(rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]], header: Sequence[str] | None = None,
          digits: int = 4) -> HTML:
    """An HTML table; rows of dicts take their keys as the header."""
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        header = list(header or dict.fromkeys(k for r in rows for k in r))
        rows = [[r.get(k) for k in header] for r in rows]  # type: ignore[union-attr]
    head = "".join(f'<th style="{CELL}; background: #f5f5f5">{escape(h)}</th>' for h in header or [])
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{cell(v, digits)}</td>' for v in row) + "</tr>" for row in rows)
    return HTML(f'<table style="border-collapse: collapse; margin: 4px 0">'
                f"{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>")


def markdown_table(markdown: str) -> HTML:
    """A pipe table as written by the report modules, as HTML (cells escaped, ``**bold**`` kept)."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    rows = [[c.strip().replace("\\*", "*") for c in line.strip("|").split("|")] for line in lines
            if not re.fullmatch(r"\|[\s:|-]+\|", line)]
    if not rows:
        return text(markdown)

    def fmt(value: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escape(value))

    head = "".join(f'<th style="{CELL}; background: #f5f5f5">{fmt(h)}</th>' for h in rows[0])
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{fmt(v)}</td>' for v in row) + "</tr>" for row in rows[1:])
    return HTML(f'<table style="border-collapse: collapse; margin: 4px 0"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def png(data: bytes, alt: str = "figure") -> HTML:
    """PNG bytes as an inline image."""
    return HTML(f'<img alt="{escape(alt)}" style="max-width: 100%" '
                f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"/>')


def figure(fig: Any, alt: str = "figure", dpi: int = 100) -> HTML:
    """A matplotlib figure as an inline PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return png(buffer.getvalue(), alt)


def image(path: str | Path, alt: str | None = None) -> HTML:
    """A PNG file as an inline image (empty if the file is missing)."""
    path = Path(path)
    return png(path.read_bytes(), alt or path.name) if path.is_file() else HTML("")


def heading(value: Any) -> HTML:
    """A small bold heading inside a card."""
    return HTML(f'<div style="font-weight: 600; margin-top: 6px">{escape(value)}</div>')


def fields(values: Mapping[str, Any], digits: int = 4) -> HTML:
    """``name: value`` lines, for a few headline numbers."""
    return HTML("".join(f"<div><b>{escape(k)}</b>: {cell(v, digits)}</div>" for k, v in values.items()))


def details(summary: Any, body: Any, open: bool = False) -> HTML:
    """A collapsible section; ``summary`` and ``body`` are escaped unless built here."""
    return HTML(f"<details{' open' if open else ''}><summary>{cell(summary)}</summary>{cell(body)}</details>")


def card(title: Any, *parts: Any) -> HTML:
    """A boxed block: a title and parts, each escaped unless built here."""
    return HTML(f'<div style="{STYLE}"><div style="font-weight: 600; margin-bottom: 4px">{cell(title)}</div>'
                f'{"".join(cell(p) for p in parts)}</div>')
