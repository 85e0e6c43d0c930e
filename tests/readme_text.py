"""Read README.md the way the tests need it: sections by heading, fenced code blocks, pipe tables."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def sections(text: str | None = None) -> dict[str, str]:
    """``## Heading`` -> the text up to the next level-2 heading (code blocks are not headings)."""
    text = README.read_text() if text is None else text
    found: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            if current is not None:
                found[current] = "\n".join(lines)
            current, lines = line[3:].strip(), []
            continue
        lines.append(line)
    if current is not None:
        found[current] = "\n".join(lines)
    return found


def code_blocks(section: str, language: str) -> list[str]:
    """The fenced blocks of ``language`` in a section's text, in order, without the fences."""
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```$", section, re.M | re.S)]


def table_rows(section: str) -> list[list[str]]:
    """The cells of every row of the first pipe table in a section (header and separator dropped)."""
    rows: list[list[str]] = []
    for line in section.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return [r for r in rows[2:]]


def code_names(cell: str) -> list[str]:
    """The `backticked` names in a cell, e.g. the flags of ``| `--a`, `--b` |``."""
    return re.findall(r"`([^`]+)`", cell)
