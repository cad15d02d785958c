"""The paper's experiment grid (the ``benchmark`` section of a config): methods x models x datasets x data fractions x seeds, as in Dutt et al.

Each cell (model, dataset, method, fraction) takes its hyper-parameters from a sweep (ASHA,
``benchmark.search="sweep"``) or from the config (``"fixed"``), then trains one final run per
seed. Every run is an ordinary training workdir under ``WORKDIR/runs/``; a finished run
(``results.json``) is never repeated, so an interrupted benchmark resumes cell by cell.
``peft_jax.hpo.report`` turns the runs into ``results.csv``, ``report.md`` and plots.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

import ml_collections

from peft_jax.config import with_values
from peft_jax.errors import UserError
from peft_jax.files import read_json
from peft_jax.hpo import space as space_lib

SCRATCH = "scratch"  # pseudo-method: full training from random weights (no pre-training, no init.checkpoint)
# The full-resolution sets in $PEFT_JAX_DATA, laid out as their releases (see the shared data's PROVENANCE.md).
RELEASE_DIRS = {"busi": "busi_full", "ham10000": "ham10000_full", "chest_xray_pneumonia": "chest_xray_full"}


def release_dir_overrides() -> dict[str, str]:
    """``benchmark.overrides`` that point each full-resolution dataset at its release folder in
    $PEFT_JAX_DATA; empty without it (``dataset.manual_dir`` must then be given per dataset)."""
    root = os.environ.get("PEFT_JAX_DATA")
    if not root:
        return {}
    return {name: f"dataset.manual_dir={os.path.join(root, folder)}" for name, folder in RELEASE_DIRS.items()}


def benchmark_section(methods: str, models: str, datasets: str, fractions: str, seeds: str,
                      overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """The ``benchmark`` section of a config file, with every field and its default.

    Grid axes are comma-separated strings, so that ``--config.benchmark.methods=lora,full`` works.
    """
    b = ml_collections.ConfigDict()
    b.methods = methods  # PEFT methods (and "scratch": full training from random weights)
    b.models = models
    b.datasets = datasets
    b.fractions = fractions  # training-label fractions, e.g. "0.1,0.25,1.0"
    # Other fractions for some datasets (name -> "0.02,0.1"), e.g. fewer for the large ones.
    b.fractions_by_dataset = ml_collections.ConfigDict({})
    b.seeds = seeds  # one final run per seed; the sweep (if any) uses the first
    b.search = "fixed"  # "fixed": hyper-parameters from overrides; "sweep": ASHA per cell (the 'sweep' section)
    b.reference = "full"  # report.md gives every method's gain over this one
    b.min_group_size = 10  # fairness gaps only over subgroups with at least this many test images
    # > 0: after each final run, explain that many test images (peft_jax/explain: explanations.json,
    # scored against the dataset's lesion masks; datasets without masks are skipped with a note).
    b.explain_images = 0
    # Training budgets in epochs: 0 keeps train.num_steps for every cell; > 0 gives each cell
    # ceil(epochs * its training examples / batch size) steps, at least min_steps and (if > 0) at most
    # max_steps, with evals_per_run validations (and checkpoints) and 10% warm-up.
    b.epochs = 0.0
    b.min_steps = 50
    b.max_steps = 0
    b.evals_per_run = 10
    # "" searches every cell; a fraction (e.g. "0.1") runs one sweep per (model, dataset, method) at that
    # fraction and gives its best values to every fraction of the method (hyper-parameters per method and
    # dataset, chosen on validation only).
    b.sweep_fraction = ""
    # Fixed overrides (a spec of key=value; see peft_jax.hpo.space) applied to every cell whose model,
    # dataset or method has that name, in this order; a sweep's values come after them.
    b.overrides = ml_collections.ConfigDict(overrides or {})
    # Optional pre-training of each model (full training on another dataset) before the transfer cells.
    b.pretrain_dataset = ""  # "" : no pre-training (cells start from init.checkpoint)
    b.pretrain_steps = 1000
    b.pretrain_lr = 1e-3
    b.pretrain_batch_size = 64
    return b


def _names(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    method: str
    fraction: float

    @property
    def path(self) -> str:
        return f"{self.model}/{self.dataset}/{self.method}/frac{self.fraction:g}"

    def describe(self) -> str:
        return f"{self.method} on {self.dataset} ({self.fraction:.0%} of the labels), {self.model}"


def _bench(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if "benchmark" not in cfg:
        raise UserError("the config has no 'benchmark' section; add one with peft_jax.hpo.benchmark_section(...) "
                         "(see configs/benchmark/mini.py)")
    return cfg.benchmark


def cells(cfg: ml_collections.ConfigDict) -> list[Cell]:
    b = _bench(cfg)
    axes = {"models": _names(b.models), "datasets": _names(b.datasets), "methods": _names(b.methods),
            "fractions": _names(b.fractions), "seeds": _names(b.seeds)}
    for axis, values in axes.items():
        if not values:
            raise UserError(f"benchmark.{axis} is empty; give a comma-separated list")
    unknown = sorted(set(b.fractions_by_dataset) - set(axes["datasets"]))
    if unknown:
        raise UserError(f"benchmark.fractions_by_dataset names {unknown}, which benchmark.datasets does not list")
    try:
        fractions = {d: [float(f) for f in _names(b.fractions_by_dataset.get(d, b.fractions))] for d in axes["datasets"]}
        [int(s) for s in axes["seeds"]]
    except ValueError:
        raise UserError(f"benchmark.fractions ({b.fractions!r}) and fractions_by_dataset must be numbers and "
                         f"benchmark.seeds ({b.seeds!r}) integers") from None
    if b.search not in ("fixed", "sweep"):
        raise UserError(f"benchmark.search must be 'fixed' or 'sweep', got {b.search!r}")
    return [Cell(m, d, meth, f) for m in axes["models"] for d in axes["datasets"] for meth in axes["methods"]
            for f in fractions[d]]


def seeds(cfg: ml_collections.ConfigDict) -> list[int]:
    return [int(s) for s in _names(_bench(cfg).seeds)]


def _overrides(cfg: ml_collections.ConfigDict, *names: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name in cfg.benchmark.overrides:
            spec = space_lib.parse_spec(cfg.benchmark.overrides[name], f"benchmark.overrides.{name}")
            bad = space_lib.searched(spec)
            if bad:
                raise UserError(f"benchmark.overrides.{name} sets fixed values; {', '.join(bad)} is a distribution "
                                 "(searched fields belong in sweep.space)")
            out.update(spec)
    return out


def cell_config(cfg: ml_collections.ConfigDict, cell: Cell, init: str | None) -> ml_collections.ConfigDict:
    """The config of a cell (with its sweep section, if any): grid values, then the named overrides."""
    scratch = cell.method == SCRATCH
    values = {"model.name": cell.model, "dataset.name": cell.dataset, "dataset.fraction": cell.fraction,
              "peft.method": "full" if scratch else cell.method}
    values.update(_overrides(cfg, cell.model, cell.dataset, cell.method))
    if scratch:
        values["init.checkpoint"] = None
    elif init:
        values["init.checkpoint"] = init
    return with_values(cfg, values, f"benchmark cell {cell.path}")


def pretrain(cfg: ml_collections.ConfigDict, model: str, workdir: pathlib.Path) -> str | None:
    """Pre-trains ``model`` once (full training on ``benchmark.pretrain_dataset``); returns its adapter folder."""
    from peft_jax.train import classify

    b = _bench(cfg)
    if not b.pretrain_dataset:
        return None
    steps = int(b.pretrain_steps)
    values = {"model.name": model, "dataset.name": b.pretrain_dataset, "dataset.fraction": 1.0,
              "peft.method": "full", "train.num_steps": steps, "train.lr": b.pretrain_lr,
              "train.batch_size": b.pretrain_batch_size, "train.eval_every": max(steps // 4, 1),
              "train.checkpoint_every": max(steps // 4, 1), "train.warmup_steps": max(steps // 10, 1),
              "train.patience": 0, "train.progress": False}
    values.update(_overrides(cfg, model))
    run_dir = workdir / "pretrain" / model
    if not (run_dir / "results.json").is_file():
        print(f"[benchmark] pre-training {model} on {b.pretrain_dataset} ({steps} steps)", flush=True)
        pre = space_lib.run_config(with_values(cfg, values, "benchmark pre-training"))
        result = classify.train_and_evaluate(pre, run_dir)
        print(f"[benchmark]   {b.pretrain_dataset} test macro-F1 {result['test']['macro_f1']:.3f}", flush=True)
    return str(run_dir / "adapter")


class TrainSizes:
    """Training examples of each cell (after the fraction's stratified subsample), read once per dataset."""

    def __init__(self):
        self._labels: dict[str, Any] = {}

    def __call__(self, cell_cfg: ml_collections.ConfigDict, fraction: float, seed: int) -> int:
        from peft_jax import data as data_lib

        key = json.dumps(cell_cfg.dataset.to_dict(), sort_keys=True, default=str) + str(seed)
        if key not in self._labels:
            full = with_values(cell_cfg, {"dataset.fraction": 1.0}, "benchmark budget")
            self._labels[key] = data_lib.load_dataset(full.dataset, seed=seed).train.labels
        return len(data_lib.stratified_subsample(self._labels[key], fraction, seed))


def budget(cfg: ml_collections.ConfigDict, batch_size: int, train_size: int) -> dict[str, Any]:
    """A cell's step budget from ``benchmark.epochs`` (empty when budgets are in steps)."""
    b = _bench(cfg)
    if not b.epochs:
        return {}
    steps = max(math.ceil(float(b.epochs) * train_size / batch_size), int(b.min_steps))
    if b.max_steps:
        steps = min(steps, int(b.max_steps))
    every = max(steps // int(b.evals_per_run), 1)
    return {"train.num_steps": steps, "train.eval_every": every, "train.checkpoint_every": every,
            "train.log_every": every, "train.warmup_steps": max(steps // 10, 1)}


def _sweep_cell(cfg: ml_collections.ConfigDict, cell: Cell) -> Cell:
    """The cell whose sweep gives ``cell`` its hyper-parameters."""
    fraction = _bench(cfg).sweep_fraction
    return cell if fraction in ("", None) else dataclasses.replace(cell, fraction=float(fraction))


def _hyper_parameters(cfg: ml_collections.ConfigDict, cell: Cell, init: str | None, workdir: pathlib.Path,
                      sizes: TrainSizes, workers: int) -> dict[str, Any] | None:
    """The searched values of a cell: none when fixed, the sweep's best otherwise (None if no trial finished)."""
    if _bench(cfg).search == "fixed":
        return {}
    target = _sweep_cell(cfg, cell)
    sweep_dir = workdir / "runs" / target.path / "sweep"
    summary_path = sweep_dir / "sweep_results.json"
    summary = read_json(summary_path, f"delete {sweep_dir} to search again") if summary_path.is_file() else None
    if summary is None or summary["best_params"] is None:
        from peft_jax.hpo import sweep as sweep_lib  # optuna: only a searched grid needs it

        seed0 = seeds(cfg)[0]
        sweep_cfg = cell_config(cfg, target, init)
        steps = budget(cfg, sweep_cfg.train.batch_size, sizes(sweep_cfg, target.fraction, seed0))
        values = {**steps, "seed": seed0}
        if steps:  # trials get the cell's budget; ASHA's first rung at a quarter of it
            rung = max(steps["train.num_steps"] // 4, 1)
            values.update({"sweep.max_resource": steps["train.num_steps"], "sweep.min_resource": rung,
                           "sweep.eval_every": rung})
        summary = sweep_lib.run_sweep(with_values(sweep_cfg, values, "benchmark sweep"), sweep_dir, workers=workers)
    return summary["best_params"]


def explain_final_run(cfg: ml_collections.ConfigDict, run_dir: pathlib.Path) -> None:
    """``benchmark.explain_images`` > 0: the run's explanations.json (once), unless its dataset has no masks."""
    num_images = int(_bench(cfg).get("explain_images", 0))
    if num_images <= 0 or (run_dir / "explanations.json").is_file():
        return
    from peft_jax.explain.masks import DatasetMasks
    from peft_jax.explain.run import explain_run, finished_run

    try:
        DatasetMasks(finished_run(run_dir).dataset)
    except ValueError as e:
        print(f"[benchmark]   no explanations: {e}", flush=True)
        return
    result = explain_run(run_dir, num_images=num_images)
    energy = ", ".join(f"{m} {s['energy']['mean']:.2f}" for m, s in result["attributions"].items()
                       if s["energy"]["n"])
    print(f"[benchmark]   explained {len(result['images'])} images in {result['seconds']:.0f} s; energy on the mask: "
          f"{energy}", flush=True)


def run_grid(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, workers: int = 1) -> list[dict]:
    """Runs (or resumes) every cell; returns one record per final run (failed runs carry an ``error``)."""
    from peft_jax.train import classify
    from peft_jax.train.workdir import Preempted

    workdir = pathlib.Path(workdir)
    grid = cells(cfg)
    for cell in grid:  # every cell's config is valid before anything trains
        cell_config(cfg, cell, None)
    run_seeds = seeds(cfg)
    total = len(grid) * len(run_seeds)
    print(f"[benchmark] {len(grid)} cells x {len(run_seeds)} seeds = {total} final runs "
          f"({_bench(cfg).search} hyper-parameters) in {workdir}", flush=True)
    inits = {model: pretrain(cfg, model, workdir) for model in dict.fromkeys(c.model for c in grid)}
    sizes = TrainSizes()
    records = []
    t0, done_now = time.time(), 0
    for i, cell in enumerate(grid):
        cell_dir = workdir / "runs" / cell.path
        cell_cfg = cell_config(cfg, cell, inits[cell.model])
        params = _hyper_parameters(cfg, cell, inits[cell.model], workdir, sizes, workers)
        if params is None:
            print(f"[benchmark] {cell.describe()}: the sweep finished no trial; no final runs", flush=True)
            records += [{"cell": cell, "seed": s, "error": "sweep finished no trial"} for s in run_seeds]
            continue
        for seed in run_seeds:
            run_dir = cell_dir / f"seed{seed}"
            record = {"cell": cell, "seed": seed, "run_dir": run_dir, "hparams": params}
            if (run_dir / "results.json").is_file() and (run_dir / "wall.json").is_file():
                explain_final_run(cfg, run_dir)
                records.append(record)
                continue
            n = i * len(run_seeds) + run_seeds.index(seed) + 1
            eta = ""
            if done_now:
                eta = f", about {(time.time() - t0) / done_now * (total - n + 1) / 60:.0f} min left"
            print(f"[benchmark] run {n}/{total}: {cell.describe()}, seed {seed}{eta}", flush=True)
            steps = budget(cfg, cell_cfg.train.batch_size, sizes(cell_cfg, cell.fraction, seed))
            run_cfg = space_lib.run_config(with_values(cell_cfg, {**steps, **params, "seed": seed}, "benchmark"))
            start = time.time()
            try:
                result = classify.train_and_evaluate(run_cfg, run_dir)
            except Preempted:  # SIGTERM: the run saved its step; the whole grid stops and a rerun continues
                raise
            except Exception as e:  # one broken run must not end a long benchmark; it is listed in the report
                record["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"[benchmark]   failed: {record['error']}", flush=True)
                records.append(record)
                continue
            (run_dir / "wall.json").write_text(json.dumps({"wall_seconds": time.time() - start}))
            explain_final_run(cfg, run_dir)
            done_now += 1
            print(f"[benchmark]   test macro-F1 {result['test']['macro_f1']:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            records.append(record)
    return records


def dry_run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[dict]:
    """Builds, shards and compiles one train step for each (model, method) of the grid; trains nothing."""
    from peft_jax.train import classify

    workdir = pathlib.Path(workdir)
    out = []
    seen = set()
    for cell in cells(cfg):
        if (cell.model, cell.method) in seen:
            continue
        seen.add((cell.model, cell.method))
        run_cfg = space_lib.run_config(cell_config(cfg, cell, None))
        t = time.time()
        result = classify.dry_run(run_cfg, workdir / "dry_run" / cell.model / cell.method)
        print(f"[dry run] {cell.model} {cell.method}: {result['trainable_params']:,} trainable "
              f"({result['trainable_percent']:.3f}%), compiled in {time.time() - t:.0f} s", flush=True)
        out.append({"model": cell.model, "method": cell.method, **result})
    (workdir / "dry_run.json").write_text(json.dumps(out, indent=2, default=str))
    return out
