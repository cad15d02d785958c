"""ASHA hyper-parameter search over the space in the config's ``sweep`` section.

    python launch/sweep.py --config configs/sweep_quick.py --workdir runs/sweep_quick [--workers 2]

Each trial is a training run in ``WORKDIR/trials/NNNN``. The study is stored in
``WORKDIR/study.db`` (or ``--config.sweep.storage=postgresql://...``, which lets sweeps on
several hosts share it: run the same command on each). Rerunning the command resumes a
killed sweep. At the end it writes ``sweep_results.json`` and ``best_overrides.txt``, a
flagfile for ``launch/train.py --config CONFIG --flagfile WORKDIR/best_overrides.txt``.
"""
from __future__ import annotations

import pathlib
import sys

from peft_jax import runtime  # sets up the allocator before jax is imported

runtime.setup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a 'sweep' section.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder (study.db, trials/, results).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trial processes on this host.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = runtime.checked_config(_CONFIG.value)
    from peft_jax.hpo import sweep

    workdir = pathlib.Path(_WORKDIR.value)
    summary = sweep.run_sweep(cfg, workdir, workers=_WORKERS.value)
    if summary["best_value"] is None:
        print(f"error: no trial finished ({summary['trials']}); see the errors in {workdir / 'sweep_results.json'}",
              file=sys.stderr)
        sys.exit(1)
    print(f"best overrides: {workdir / 'best_overrides.txt'}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    runtime.run(main)
