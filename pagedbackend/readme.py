"""Tables in README.md that are generated from the code that declares them (settings,
architectures): replace one in place, under its heading; tests check they are up to date."""

from __future__ import annotations

import os
from pathlib import Path


def replace_table(path: str | os.PathLike, heading: str, table: str) -> bool:
    """Replace the first markdown table after `heading` with `table`; True if the file changed."""
    readme = Path(path)
    text = readme.read_text()
    start = text.index(heading) + len(heading)
    table_start = text.index("\n|", start) + 1
    end = table_start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    new = text[:table_start] + table + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text


def table_under(path: str | os.PathLike, heading: str) -> str:
    """The markdown table the README has after `heading` (for the up-to-date checks)."""
    text = Path(path).read_text()
    start = text.index(heading) + len(heading)
    table_start = text.index("\n|", start) + 1
    end = table_start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return text[table_start:end]
