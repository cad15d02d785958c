"""BENCHMARKS.md is shared by several benchmark scripts: each owns one '## ' section of it."""
from __future__ import annotations

import pathlib


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the architecture where there is none): speed figures need it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def environment(*packages: str) -> dict:
    """Where a figure was measured: date, CPU model, cores, Python, the JAX allocator and the named packages'
    versions (every speed figure needs them beside it)."""
    import datetime
    import os
    import platform
    from importlib import metadata

    from peft_jax import allocator

    return {"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), **{p: metadata.version(p) for p in packages},
            "allocator": allocator.loaded()}


def gb(n: float | None) -> str:
    """Bytes as GB in a table cell (empty where not measured)."""
    return "" if n is None else f"{n / 1e9:.2f}"


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


def score_row(cells: list[str], runs: list[dict]) -> str:
    """A table row: ``cells``, then mean ± std over ``runs`` (results.json dicts) of the test macro-F1 and
    AUROC, then the number of runs."""
    import statistics

    scores = [[r["test"][k] for r in runs] for k in ("macro_f1", "auroc")]
    stats = [f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in scores]
    return "| " + " | ".join([*cells, *stats, str(len(runs))]) + " |"
