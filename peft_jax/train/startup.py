"""Where the seconds before a run's first step go: imports, data, model, compilation.

A newcomer's first question about a slow start is which of these it is; the first run of a process
also counts the imports (the time since the process started, read from /proc on Linux).
"""
from __future__ import annotations

import os
import time

_FIRST_RUN = [True]  # later runs of one process (sweeps, benchmark grids) have no import time to report


def process_seconds() -> float | None:
    """Seconds since this process started (an exec keeps the start time), or None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class StartupClock:
    """Marks the end of each start-up phase; ``line()`` is the one line a run prints before its first step."""

    def __init__(self):
        self.phases: list[tuple[str, float]] = []
        self.last = time.time()
        age = process_seconds() if _FIRST_RUN[0] else None
        _FIRST_RUN[0] = False
        if age is not None:
            self.phases.append(("imports and config", age))

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases.append((phase, now - self.last))
        self.last = now

    def line(self) -> str:
        total = sum(s for _, s in self.phases)
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.phases)
        return f"[start-up] ready to train after {total:.1f} s: {parts}"
