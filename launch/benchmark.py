"""The paper's experiment grid (peft_jax/hpo/grid.py: methods x models x datasets x data fractions x seeds) and its report.

    python launch/benchmark.py --config configs/benchmark/mini.py --workdir runs/mini --report_dir results/mini
    python launch/benchmark.py --config configs/benchmark/paper_vit.py --workdir runs/paper_vit --dry_run

Every run is a training workdir under ``WORKDIR/runs/<model>/<dataset>/<method>/frac<f>/seed<s>``;
rerunning the command skips finished runs and continues interrupted ones. It writes
``results.csv``, ``report.md``, ``f1_vs_fraction.png`` and ``f1_vs_trainable.png`` into
``--report_dir`` (default: the workdir). ``--dry_run`` compiles one train step for each
(model, method) of the grid and trains nothing.
"""
from __future__ import annotations

import pathlib
import shlex
import sys

from peft_jax import runtime  # sets up the allocator before jax is imported

runtime.setup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a 'benchmark' section.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the runs (and sweeps) of the grid.")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where results.csv, report.md and plots go (default: workdir).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trial processes per sweep (benchmark.search='sweep').")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile one train step per (model, method); train nothing.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = runtime.checked_config(_CONFIG.value, names=False)  # the grid checks every cell's names
    from peft_jax.hpo import grid, report

    workdir = pathlib.Path(_WORKDIR.value)
    if _DRY_RUN.value:
        grid.dry_run(cfg, workdir)
        print(f"dry run passed for every (model, method); details in {workdir / 'dry_run.json'}")
        return
    from peft_jax.train.workdir import Preempted

    try:
        records = grid.run_grid(cfg, workdir, workers=_WORKERS.value)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as launch/train.py: rerunning continues from the saved step
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    summary = report.write_all(records, pathlib.Path(_REPORT_DIR.value or workdir), command, str(cfg),
                               reference=cfg.benchmark.reference, min_group_size=cfg.benchmark.min_group_size)
    print(f"[benchmark] {summary['runs']} runs ({summary['failed']} failed); report in "
          f"{pathlib.Path(summary['out_dir']) / 'report.md'}")
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    runtime.run(main)
