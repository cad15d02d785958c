"""BENCHMARKS.md is shared by several benchmark scripts: each owns one '## ' section of it."""
from __future__ import annotations

import pathlib


def write_section(path: pathlib.Path, heading: str, section: str) -> None:
    """Replaces the section that starts with ``heading`` (or appends it); other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured on this project's machines.\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
