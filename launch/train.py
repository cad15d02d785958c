"""Train and evaluate one PEFT experiment (peft_jax/train/classify.py).

    python launch/train.py --config configs/vit_b_lora.py --config.dataset.name=breastmnist --workdir runs/x

Rerunning the same command continues from the last checkpoint. With
``--config.dry_run=True`` it only builds, shards and compiles one step (``dry_run.json``).
"""
from __future__ import annotations

import json
import pathlib
import sys

from peft_jax import runtime  # sets up the allocator before jax is imported

runtime.setup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
SUMMARY = ("method", "model", "dataset", "trainable_params", "trainable_percent", "best_step", "val", "test")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = runtime.checked_config(_CONFIG.value)
    from peft_jax.train import classify, workdir

    runtime.init_distributed(cfg)
    config_name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    folder = pathlib.Path(_WORKDIR.value or f"runs/{config_name}")
    if cfg.dry_run:
        print(json.dumps(classify.dry_run(cfg, folder), indent=1, default=str))
        return
    try:
        result = classify.train_and_evaluate(cfg, folder)
    except workdir.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: schedulers requeue; rerunning continues from the saved step
    print(json.dumps({k: result[k] for k in SUMMARY}, indent=1, default=str))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    runtime.run(main)
