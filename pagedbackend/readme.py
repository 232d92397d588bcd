"""Tables in README.md that are generated from the code that declares them (settings,
architectures): replace one in place, under its heading; tests check they are up to date."""

from __future__ import annotations

import os
from pathlib import Path


def _table_span(text: str, heading: str) -> tuple[int, int]:
    """[start, end) of the first markdown table after `heading`."""
    start = text.index("\n|", text.index(heading) + len(heading)) + 1
    end = start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return start, end


def replace_table(path: str | os.PathLike, heading: str, table: str) -> bool:
    """Replace the first markdown table after `heading` with `table`; True if the file changed."""
    readme = Path(path)
    text = readme.read_text()
    start, end = _table_span(text, heading)
    new = text[:start] + table + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text


def table_under(path: str | os.PathLike, heading: str) -> str:
    """The markdown table the README has after `heading` (for the up-to-date checks)."""
    text = Path(path).read_text()
    start, end = _table_span(text, heading)
    return text[start:end]
