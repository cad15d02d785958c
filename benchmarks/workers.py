"""A benchmark's worker process: one row measured in a process of its own (its own flags, allocator and peak RSS)."""
from __future__ import annotations

import json
import subprocess
import sys


class WorkerProcess:
    """A process running ``python <argv>`` that prints 'ready', then answers each command line on stdin with one
    JSON line; 'done' (or any line it does not know) ends it with its final JSON. Ready when constructed."""

    def __init__(self, row: dict, argv: list[str], env: dict):
        self.row = row
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker for {self.row} failed to start (exit code {self.proc.wait()})")

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def finish(self) -> dict:
        """The row with the worker's final JSON, after the process has exited."""
        result = self.ask("done")
        self.proc.wait()
        return {**self.row, **result}
