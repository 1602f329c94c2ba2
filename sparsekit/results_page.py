"""The book's results page: every chapter's recorded headline lines and tables, rendered as markdown.

During a book run each notebook records its headline results into ``$SPARSEKIT_RESULTS_DIR``
(:func:`sparsekit.book.record_results`: ``<notebook>.json``, ``{label: text}``;
:func:`record_table`: ``<notebook>.tables.json``, ``{title: [row, ...]}``). After the notebooks,
:func:`sparsekit.book.main` calls :func:`write_results_tables`, which renders them in reading order into
``book/_executed/results_tables.md``; ``book/results.md`` includes that file, so the page shows what the
last run measured and nothing typed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from sparsekit.fileio import atomic_write_json, atomic_write_text

__all__ = ["record_table", "render_results_tables", "write_results_tables", "TABLES_SUFFIX"]

TABLES_SUFFIX = ".tables.json"


def record_table(notebook: str, title: str, frame) -> None:
    """Called by a notebook: one headline table (a pandas DataFrame; its index becomes the first column)
    for the results page. Written into ``$SPARSEKIT_RESULTS_DIR`` during a book run, else nothing."""
    folder = os.environ.get("SPARSEKIT_RESULTS_DIR")
    if not folder:
        return None
    if not isinstance(title, str) or not title:
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    path = Path(folder) / f"{notebook}{TABLES_SUFFIX}"
    tables = json.loads(path.read_text()) if path.exists() else {}
    records = json.loads(frame.reset_index().to_json(orient="records"))  # NaN -> null
    tables[title] = records
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, tables)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(empty table)"]
    columns = list(rows[0])
    out = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return out


def render_results_tables(results_dir: Path, notebooks: Sequence[str]) -> str:
    """Markdown: one section per notebook of ``notebooks`` that recorded anything, in that order."""
    out = []
    for name in notebooks:
        lines_path = results_dir / f"{name}.json"
        tables_path = results_dir / f"{name}{TABLES_SUFFIX}"
        if not lines_path.exists() and not tables_path.exists():
            continue
        out += [f"## {name}", "", f"Chapter {{doc}}`_executed/{name}`.", ""]
        if tables_path.exists():
            for title, rows in json.loads(tables_path.read_text()).items():
                out += [f"**{title}**", "", *_markdown_table(rows), ""]
        if lines_path.exists():
            lines = json.loads(lines_path.read_text())
            out += ["| result | value |", "|---|---|"]
            out += [f"| {_cell(label)} | {_cell(text)} |" for label, text in lines.items()]
            out.append("")
    if not out:
        return "No chapter has recorded results yet: run `make book` (or `python -m sparsekit.book`).\n"
    return "\n".join(out)


def write_results_tables(results_dir: Path, notebooks: Sequence[str], target: Path) -> Path:
    """Render :func:`render_results_tables` into ``target`` (atomically); returns ``target``."""
    return atomic_write_text(target, render_results_tables(Path(results_dir), notebooks))
