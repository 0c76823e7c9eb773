"""Evaluation reports: one structure written as ``report.md`` and a self-contained ``report.html``.

A :class:`Report` is a title and a list of sections; each section may hold text, one table of
metrics (rows: metrics, columns: models) and figures (PNG files beside the report, linked by
relative path). The metric table shows each value with its 95% interval when one exists.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.files import atomic_write_text

SKIPPED_KEYS = {"n", "warnings"}


def format_metric(value: Any, interval: Sequence[float] | None = None) -> str:
    """``0.512 [0.480, 0.545]``; ``-`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def metric_keys(columns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The numeric metric keys of the columns, in first-seen order (intervals and notes left
    out)."""
    keys: list[str] = []
    for metrics in columns.values():
        for key, value in metrics.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            shown = key not in SKIPPED_KEYS and not key.endswith(("_ci", "_std"))
            if numeric and shown and key not in keys:
                keys.append(key)
    return keys


def metric_rows(columns: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Header row plus one row per metric key, the cells formatted with their intervals."""
    rows = [["metric", *columns]]
    for key in metric_keys(columns):
        cells = [format_metric(m.get(key), m.get(f"{key}_ci")) for m in columns.values()]
        rows.append([key, *cells])
    return rows


@dataclass
class Section:
    """A heading with optional text, a table (rows of cells, first row the header) and figures
    (``(caption, path relative to the report)``)."""

    heading: str
    text: str = ""
    table: list[list[str]] | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    """A titled list of sections, written as markdown and as HTML."""

    title: str
    sections: list[Section] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured markdown."""
        lines = [f"# {self.title}", ""]
        for section in self.sections:
            lines += [f"## {section.heading}", ""]
            if section.text:
                lines += [section.text, ""]
            if section.table:
                lines += [markdown_table(section.table), ""]
            for caption, path in section.figures:
                lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The report as one HTML page (figures linked, not embedded)."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for section in self.sections:
            body.append(f"<h2>{html.escape(section.heading)}</h2>")
            if section.text:
                body.append(f"<p>{html.escape(section.text)}</p>")
            if section.table:
                body.append(html_table(section.table))
            for caption, path in section.figures:
                body.append(
                    f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        return HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))

    def write(self, folder: str | Path, name: str = "report") -> tuple[Path, Path]:
        """Write ``folder/name.md`` and ``folder/name.html``; returns both paths."""
        folder = Path(folder)
        markdown = atomic_write_text(folder / f"{name}.md", self.to_markdown())
        page = atomic_write_text(folder / f"{name}.html", self.to_html())
        return markdown, page


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cells (the first is the header) as a markdown table."""
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    """Rows of cells (the first is the header) as an HTML table."""
    header, *body = rows
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in body:
        lines.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
figure {{ margin: 1em 0; }} figcaption {{ color: #555; font-size: 90%; }}
</style></head>
<body>
{body}
</body></html>
"""
