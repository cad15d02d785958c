"""The quickstart run: one backbone transferred to one dataset by several methods, against training
from scratch and the majority-class baseline, as one table.

Every stage is an ordinary training run in its own sub-folder of the workdir, so an interrupted
quickstart resumes where it stopped. Without ``init.checkpoint`` the backbone is first pre-trained
on ``quickstart.pretrain_dataset`` (the ViT miniature); with it (ImageNet EfficientNet-Lite0 by
default) the transfer starts from those weights.
"""
from __future__ import annotations

import json
import pathlib
import time

import ml_collections
import numpy as np

from peft_jax.train import classify
from peft_jax.config import with_values
from peft_jax.metrics import classification as metrics_lib

SCRATCH = "scratch"  # full training from random weights


def stage_config(cfg: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A copy of the experiment config with dotted fields changed."""
    return with_values(cfg, changes, "quickstart")


def pretrain(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    """Full training on the pre-training dataset; returns the adapter folder the transfers start from."""
    q = cfg.quickstart
    every = max(q.pretrain_steps // 4, 1)
    pre = stage_config(cfg, **{
        "dataset.name": q.pretrain_dataset, "dataset.fraction": 1.0, "peft.method": "full",
        "train.num_steps": q.pretrain_steps, "train.lr": q.pretrain_lr, "train.batch_size": q.pretrain_batch_size,
        "train.eval_every": every, "train.checkpoint_every": every, "train.warmup_steps": max(q.pretrain_steps // 10, 1)})
    print(f"== pre-training {cfg.model.name} on {q.pretrain_dataset} ({q.pretrain_steps} steps)", flush=True)
    result = classify.train_and_evaluate(pre, workdir / "pretrain")
    print(f"   {q.pretrain_dataset} test macro-F1 {result['test']['macro_f1']:.3f}", flush=True)
    return str(workdir / "pretrain" / "adapter")


def transfer(cfg: ml_collections.ConfigDict, method: str, init: str, workdir: pathlib.Path) -> dict:
    """One method's run; its row of the table."""
    scratch = method == SCRATCH
    changes = {"peft.method": "full" if scratch else method, "train.lr": cfg.quickstart.lr[method],
               "init.checkpoint": None if scratch else init}
    if method not in ("full", SCRATCH):
        changes["train.bn_stats"] = cfg.quickstart.peft_bn_stats
    run = stage_config(cfg, **changes)
    print(f"== {method} on {cfg.dataset.name} ({cfg.dataset.fraction:.0%} of the training labels)", flush=True)
    t = time.time()
    r = classify.train_and_evaluate(run, workdir / method)
    return {"method": "full, from scratch" if scratch else method, "trainable_params": r["trainable_params"],
            "trainable_percent": r["trainable_percent"], "val_macro_f1": r["val"]["macro_f1"],
            "test_macro_f1": r["test"]["macro_f1"], "test_auroc": r["test"]["auroc"], "seconds": time.time() - t,
            "train_examples": r["train_examples"]}


def majority_row(workdir: pathlib.Path, method: str) -> dict:
    """The majority-class baseline on the test images a finished run was scored on."""
    with np.load(workdir / method / "test_predictions.npz", allow_pickle=False) as f:
        labels, num_classes = f["labels"], f["logits"].shape[-1]
    base = metrics_lib.majority_baseline(labels, num_classes)
    return {"method": "majority class (no training)", "trainable_params": 0, "trainable_percent": 0.0,
            "val_macro_f1": None, "test_macro_f1": base["macro_f1"], "test_auroc": 0.5, "seconds": 0.0}


def format_table(rows: list[dict]) -> str:
    header = "| method | trainable params | trainable % | val macro-F1 | test macro-F1 | test AUROC | seconds |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        val = "–" if r["val_macro_f1"] is None else f"{r['val_macro_f1']:.3f}"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f} | {val} | "
                     f"{r['test_macro_f1']:.3f} | {r['test_auroc']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[dict]:
    """Runs (or resumes) every stage, prints the table and writes summary.md / summary.json."""
    workdir = pathlib.Path(workdir)
    start = time.time()
    init = cfg.init.checkpoint or pretrain(cfg, workdir)
    methods = [m.strip() for m in cfg.quickstart.methods.split(",") if m.strip()]
    rows = [transfer(cfg, method, init, workdir) for method in methods]
    rows.append(majority_row(workdir, methods[0]))
    table = format_table(rows)
    source = cfg.init.checkpoint or f"{cfg.quickstart.pretrain_dataset} (pre-trained here)"
    title = (f"Transfer {source} -> {cfg.dataset.name}, {cfg.dataset.fraction:.0%} of the training labels "
             f"({rows[0]['train_examples']} images), {cfg.model.name} at {cfg.model.image_size} px:")
    (workdir / "summary.md").write_text(f"{title}\n\n{table}\n")
    (workdir / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{title}\n\n{table}\n\nquickstart finished in {time.time() - start:.0f} s; results in {workdir}/",
          flush=True)
    return rows
