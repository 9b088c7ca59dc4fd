"""Rendering: one table model (:class:`Table` of :class:`Cell`) drawn as markdown, HTML, CSV or console text.

Every table zsad prints goes through here: the leaderboard, the ``zsad train/test`` summary and the throughput
report. Pure Python (no torch, nothing else of zsad).
"""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsad.results.aggregate import NULL
from zsad.results.schema import MAIN_KEYS


@dataclass
class Cell:
    """One table cell; ``mark`` is a footnote marker drawn after the (possibly bold) text."""

    text: str
    bold: bool = False
    mark: str = ""


@dataclass
class Table:
    """A table: caption, header, rows of cells; optional column groups above the header and notes below.

    ``align`` gives per column ``"l"`` or ``"r"``; by default the first column is left-aligned, the others right.
    """

    caption: str
    header: list[str]
    rows: list[list[Cell]]
    # (group title, columns spanned) above the header
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    align: list[str] | None = None

    def alignment(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.header) - 1)


@dataclass
class Section:
    """A titled part of a document: paragraphs (markdown bold/code allowed), tables and images."""

    title: str
    level: int = 2
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def cells(texts: Sequence[Any]) -> list[Cell]:
    """Plain cells from values (``None`` → ``–``)."""
    return [Cell(NULL if t is None else str(t)) for t in texts]


def slug(s: str) -> str:
    """``s`` as a file-name part (anything but letters, digits and ``-_.`` becomes ``_``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def percent(v: float | None) -> str:
    """A fraction as a percentage with one decimal, ``–`` when undefined."""
    return NULL if v is None else f"{100 * v:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# markdown


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def table_markdown(t: Table, caption: bool = True) -> list[str]:
    """The table's markdown lines: bold caption, header (with its column group as ``group · column``), rows, notes."""
    lines = [f"**{t.caption}**", ""] if caption else []
    header = t.header
    if t.groups:
        names = [g for g, n in t.groups for _ in range(n)]
        header = [f"{g} · {h}" if g else h for g, h in zip(names, t.header)]
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in t.alignment()) + "|")
    for row in t.rows:
        texts = [(f"**{c.text}**" if c.bold else c.text) + c.mark for c in row]
        lines.append("| " + " | ".join(_md_escape(c) for c in texts) + " |")
    lines.append("")
    for n in dict.fromkeys(t.notes):
        lines += [f"<sub>{n}</sub>  "]
    if t.notes:
        lines.append("")
    return lines


def to_markdown(title: str, sections: Sequence[Section], out_dir: Path) -> str:
    """A document as markdown; images are linked relative to ``out_dir``."""
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += ["#" * sec.level + " " + sec.title, ""]
        for p in sec.paragraphs:
            lines += [p, ""]
        for t in sec.tables:
            lines += table_markdown(t)
        for img in sec.images:
            lines += [f"![{img.stem}]({img.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# console


def table_console(t: Table) -> str:
    """The table as aligned plain text (header and rows, two spaces between columns; no bold, no notes)."""
    rows = [t.header, *[[c.text + c.mark for c in r] for r in t.rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(t.header))]
    align = t.alignment()

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align))

    return "\n".join(line(r) for r in rows)


def summary_table(metrics: Mapping[str, Any], keys: Sequence[str] = MAIN_KEYS) -> str:
    """Per-dataset means of the main metrics of one ``metrics.json``, in percent, as papers print them."""
    rows = [
        cells([name, data.get("n_images", ""), *[percent(data["mean"].get(k)) for k in keys]])
        for name, data in metrics.get("datasets", {}).items()
    ]
    return table_console(Table("", ["dataset", "images", *keys], rows))


# ---------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.5em}h1 .warn{color:#b00020}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.85em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}td.best{font-weight:700;background:#eaf5ea}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{font-size:.8em;color:#555;margin:0}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
"""


def _html_text(s: str) -> str:
    """Escape, then honour the two markdown bits the header uses: **bold** and `code`."""
    out, bold, code = [], False, False
    for ch in _split_marks(s):
        if ch == "**":
            out.append("</b>" if bold else "<b>")
            bold = not bold
        elif ch == "`":
            out.append("</code>" if code else "<code>")
            code = not code
        else:
            out.append(html.escape(ch.replace("\\*", "*")))
    return "".join(out)


def _split_marks(s: str) -> list[str]:
    parts, buf, i = [], "", 0
    while i < len(s):
        if s.startswith("\\*", i):
            buf += "\\*"
            i += 2
        elif s.startswith("**", i) or s[i] == "`":
            mark = "**" if s.startswith("**", i) else "`"
            parts += [buf, mark]
            buf = ""
            i += len(mark)
        else:
            buf += s[i]
            i += 1
    return parts + [buf]


def table_html(tab: Table) -> list[str]:
    """The table as HTML lines (caption, grouped header, best cells with class ``best``, notes)."""
    parts = [f"<table><caption>{html.escape(tab.caption)}</caption><thead>"]
    if tab.groups and any(g for g, _ in tab.groups):
        parts.append(
            "<tr>" + "".join(f'<th colspan="{n}">{html.escape(g)}</th>' for g, n in tab.groups) + "</tr>"
        )
    parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in tab.header) + "</tr></thead><tbody>")
    for row in tab.rows:
        tds = []
        for c in row:
            cls = ' class="best"' if c.bold else ""
            tds.append(f"<td{cls}>{_html_text(c.text)}{html.escape(c.mark)}</td>")
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{_html_text(n)}</p>' for n in dict.fromkeys(tab.notes)]
    return parts


def to_html(title: str, sections: Sequence[Section], warning: str = "") -> str:
    """A self-contained HTML page (images embedded); a title ending in `` — <warning>`` shows it in red."""
    t = html.escape(title)
    if warning and title.endswith(f" — {warning}"):
        t = (
            html.escape(title.removesuffix(f" — {warning}"))
            + f' — <span class="warn">{html.escape(warning)}</span>'
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{t}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h{sec.level}>{html.escape(sec.title)}</h{sec.level}>")
        parts += [f"<p>{_html_text(p)}</p>" for p in sec.paragraphs]
        for tab in sec.tables:
            parts += table_html(tab)
        for img in sec.images:
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CSV


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> Path:
    """Flat rows as CSV with the given columns (``None`` → empty cell)."""
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return Path(path)
