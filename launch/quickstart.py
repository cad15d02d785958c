"""The quickstart: pre-train a small ViT on PneumoniaMNIST, transfer it to BreastMNIST with
several PEFT methods at a low data fraction, and print a table of test macro-F1.

    python launch/quickstart.py [--config configs/quickstart.py] [--workdir runs/quickstart]

Every stage is an ordinary ``launch/train.py`` run in its own sub-folder, so an interrupted
quickstart resumes where it stopped. With ``--config.init.checkpoint=...`` it skips the
pre-training and transfers from those weights instead.
"""
from __future__ import annotations

import copy
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from peft_jax import runtime  # noqa: E402

runtime.setup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"),
    "Quickstart config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output folder.")


def stage_config(cfg, **changes):
    """A copy of the experiment config with dotted fields changed."""
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        node = new
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return new


def format_table(rows: list[dict]) -> str:
    header = "| method | trainable params | trainable % | val macro-F1 | test macro-F1 | test AUROC | seconds |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} | "
                     f"{r['val_macro_f1']:.3f} | {r['test_macro_f1']:.3f} | {r['test_auroc']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    from peft_jax.train import loop

    cfg = _CONFIG.value
    q = cfg.quickstart
    workdir = pathlib.Path(_WORKDIR.value)
    start = time.time()
    init = cfg.init.checkpoint
    if not init:
        pre = stage_config(cfg, **{
            "dataset.name": q.pretrain_dataset, "dataset.fraction": 1.0, "peft.method": "full",
            "train.num_steps": q.pretrain_steps, "train.lr": q.pretrain_lr, "train.batch_size": q.pretrain_batch_size,
            "train.eval_every": max(q.pretrain_steps // 4, 1), "train.checkpoint_every": max(q.pretrain_steps // 4, 1),
            "train.warmup_steps": max(q.pretrain_steps // 10, 1)})
        print(f"== pre-training {cfg.model.name} on {q.pretrain_dataset} ({q.pretrain_steps} steps)")
        result = loop.train_and_evaluate(pre, workdir / "pretrain")
        print(f"   {q.pretrain_dataset} test macro-F1 {result['test']['macro_f1']:.3f}")
        init = str(workdir / "pretrain" / "adapter")

    rows = []
    for method in [m.strip() for m in q.methods.split(",") if m.strip()]:
        scratch = method == "scratch"
        run = stage_config(cfg, **{"peft.method": "full" if scratch else method, "train.lr": q.lr[method],
                                   "init.checkpoint": None if scratch else init})
        print(f"== {method} on {cfg.dataset.name} ({cfg.dataset.fraction:.0%} of the training labels)")
        t = time.time()
        r = loop.train_and_evaluate(run, workdir / method)
        rows.append({"method": method if not scratch else "full, from scratch",
                     "trainable_params": r["trainable_params"], "trainable_percent": r["trainable_percent"],
                     "val_macro_f1": r["val"]["macro_f1"], "test_macro_f1": r["test"]["macro_f1"],
                     "test_auroc": r["test"]["auroc"], "seconds": time.time() - t})
    table = format_table(rows)
    (workdir / "summary.md").write_text(table + "\n")
    (workdir / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\nTransfer {q.pretrain_dataset if not cfg.init.checkpoint else cfg.init.checkpoint} -> {cfg.dataset.name}, "
          f"{cfg.dataset.fraction:.0%} of the training labels, {cfg.model.name} (depth {cfg.model.depth}):\n")
    print(table)
    print(f"\nquickstart finished in {time.time() - start:.0f} s; results in {workdir}/")


if __name__ == "__main__":
    runtime.run(main)
