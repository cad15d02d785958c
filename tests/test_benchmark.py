"""The paper's experiment grid (peft_jax/hpo/grid.py): two tiny cells on BreastMNIST, its CSV, report and plots;
a grid with fixed hyper-parameters needs no optuna, a searched one does."""
import csv
import json
import pathlib
import runpy

import numpy as np
import pytest

from peft_jax import hpo
from peft_jax.config import base_config, with_values
from peft_jax.hpo import grid, report
from peft_jax.metrics import classification


def _sweep_lib():
    pytest.importorskip("optuna", reason="the hpo extra: pip install -e '.[hpo]'")
    from peft_jax.hpo import sweep

    return sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_two_cell_grid_writes_csv_report_and_plots(shared_data, tmp_path, capsys):
    cfg = with_values(base_config(), {
        "model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4, "model.depth": 1,
        "train.batch_size": 16, "train.num_steps": 10, "train.eval_every": 5, "train.warmup_steps": 2,
        "train.progress": False})
    cfg.benchmark = hpo.benchmark_section(methods="linear,full", models="vit_ti16", datasets="breastmnist",
                                          fractions="0.5", seeds="0", overrides={"linear": "train.lr=1e-2"})
    cfg.lock()
    records = grid.run_grid(cfg, tmp_path / "work")
    out = tmp_path / "report"
    summary = report.write_all(records, out, "python launch/benchmark.py ...", str(cfg))

    assert summary == {"runs": 2, "failed": 0, "out_dir": str(out)}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["linear", "full"]
    assert rows[0]["trainable_params"] == str(192 * 2 + 2)  # the head of ViT-Ti for 2 classes
    assert rows[0]["hparams"] == "{}" and float(rows[0]["data_fraction"]) == 0.5
    assert all(float(r["wall_seconds"]) > 0 for r in rows)
    for row, record in zip(rows, records):  # the CSV's score is the run's, recomputed from its test predictions
        saved = np.load(record["run_dir"] / "test_predictions.npz")
        expected = classification.classification_metrics(saved["labels"], saved["logits"])["macro_f1"]
        assert float(row["test_macro_f1"]) == pytest.approx(expected, abs=1e-6)
        assert len(saved["labels"]) == 156  # BreastMNIST's test split
    text = (out / "report.md").read_text()
    assert "### vit_ti16, 50% of the training labels" in text
    assert "| method | trainable % | breastmnist | mean | Δ vs full |" in text
    assert "| full | 100.0 |" in text and "+0.000 |" in text and "**" in text
    for name in ("f1_vs_fraction.png", "f1_vs_trainable.png"):
        assert (out / name).read_bytes()[:8] == PNG

    # Rerunning resumes: the finished runs are read back, nothing trains again.
    capsys.readouterr()
    again = grid.run_grid(cfg, tmp_path / "work")
    assert len(again) == 2 and "run 1/2" not in capsys.readouterr().out


def test_fairness_table_from_subgroups():
    """Every subgroup with its n and a 95% interval; the gap only over subgroups of at least min_group_size
    images (a singleton scoring 0 would make it 0.7), the others named as left out."""
    cell = grid.Cell("vit_b16", "ham10000", "lora", 1.0)

    def groups(f, m, single):
        return {"female": {"macro_f1": f, "n": 40}, "male": {"macro_f1": m, "n": 60},
                "acral": {"macro_f1": single, "n": 1}}

    rows = [{"model": "vit_b16", "dataset": "ham10000", "method": "lora", "data_fraction": 1.0,
             "subgroups": {"sex": {"groups": groups(f, m, s), "gap": 1.0}}}
            for f, m, s in ((0.8, 0.7, 0.0), (0.6, 0.7, 1.0))]
    text = report.fairness_tables(rows)
    assert f"### {cell.dataset}, {cell.model}, 100% of the labels: macro-F1 by sex" in text
    assert "| method | female (n=40) | male (n=60) | acral (n=1) | gap |" in text
    # female: mean 0.7, half-width 1.96 sqrt(0.7 * 0.3 / 40 + 0.02 / 2) = 0.24; male: 0.7 +- 0.116
    assert "| lora | 0.700 [0.46, 0.94] | 0.700 [0.58, 0.82] | 0.500 [0.00, 1.00] | 0.000 |" in text
    assert "at least 10 test images; left out: acral (n=1)." in text
    assert "| 0.200 |" in report.fairness_tables(rows, min_group_size=1)  # the singleton counts: 0.7 - 0.5


@pytest.mark.parametrize("name", ["mini", "paper_vit", "paper_resnet"])
def test_benchmark_configs_make_valid_cells(name):
    cfg = runpy.run_path(str(ROOT / "configs" / "benchmark" / f"{name}.py"))["get_config"]()
    cfg.lock()
    cells = grid.cells(cfg)
    assert cells and grid.seeds(cfg)
    checked = set()
    for cell in cells:
        c = grid.cell_config(cfg, cell, None)
        assert c.peft.method in (cell.method, "full") and c.dataset.fraction == cell.fraction
        if cfg.benchmark.search == "sweep" and cell.method not in checked:  # every key of the space exists
            _sweep_lib().check_space(c)
            checked.add(cell.method)


def test_bad_grid_is_an_error_naming_the_field():
    cfg = base_config()
    cfg.benchmark = hpo.benchmark_section(methods="lora", models="vit_ti16", datasets="breastmnist",
                                          fractions="ten percent", seeds="0")
    with pytest.raises(ValueError, match="benchmark.fractions"):
        grid.cells(cfg)
    cfg.benchmark = hpo.benchmark_section(methods="lora", models="vit_ti16", datasets="breastmnist", fractions="0.1",
                                          seeds="0", overrides={"lora": "train.lr=log(1e-4, 1e-2)"})
    with pytest.raises(ValueError, match="benchmark.overrides.lora"):
        grid.cell_config(cfg, grid.cells(cfg)[0], None)


def test_one_sweep_per_method_serves_every_fraction_with_epoch_budgets(shared_data, tmp_path):
    _sweep_lib()
    cfg = with_values(base_config(), {
        "model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4, "model.depth": 1,
        "train.batch_size": 16, "train.progress": False})
    cfg.benchmark = hpo.benchmark_section(methods="linear", models="vit_ti16", datasets="breastmnist",
                                          fractions="0.05,0.1", seeds="0")
    cfg.benchmark.update(search="sweep", sweep_fraction="0.1", epochs=1.0, min_steps=8, evals_per_run=2)
    cfg.sweep = hpo.sweep_section(num_trials=2, space={"common": "train.lr=log(1e-3, 1e-1)"})
    cfg.lock()
    records = grid.run_grid(cfg, tmp_path / "work")
    runs = tmp_path / "work" / "runs" / "vit_ti16" / "breastmnist" / "linear"
    assert sorted(p.name for p in runs.iterdir()) == ["frac0.05", "frac0.1"]
    assert (runs / "frac0.1" / "sweep" / "sweep_results.json").is_file()
    assert not (runs / "frac0.05" / "sweep").exists()  # the 5% cell reuses the 10% sweep
    assert records[0]["hparams"] == records[1]["hparams"] and "train.lr" in records[0]["hparams"]
    steps = [json.loads((r["run_dir"] / "results.json").read_text())["steps_run"] for r in records]
    assert steps == [8, 8]  # 1 epoch of 27 or 55 images at batch 16 is under min_steps
    assert all((r["run_dir"] / "test_predictions.npz").is_file() for r in records)


def test_fractions_by_dataset_give_a_large_dataset_fewer_cells():
    cfg = base_config()
    cfg.benchmark = hpo.benchmark_section(methods="linear", models="vit_ti16", datasets="breastmnist,pneumoniamnist",
                                          fractions="0.1,1.0", seeds="0")
    cfg.benchmark.fractions_by_dataset = {"pneumoniamnist": "0.02"}
    assert [(c.dataset, c.fraction) for c in grid.cells(cfg)] == [
        ("breastmnist", 0.1), ("breastmnist", 1.0), ("pneumoniamnist", 0.02)]
    cfg.benchmark.fractions_by_dataset = {"ham10000": "0.1"}
    with pytest.raises(ValueError, match="fractions_by_dataset names"):
        grid.cells(cfg)


def test_a_sigterm_stops_the_whole_grid_not_only_its_run(shared_data, tmp_path, monkeypatch):
    from peft_jax.train import classify
    from peft_jax.train.workdir import Preempted

    calls = []

    def preempted(run_cfg, run_dir, **kwargs):
        calls.append(run_dir)
        raise Preempted(f"[preempted] SIGTERM at step 3: saved {run_dir}")

    monkeypatch.setattr(classify, "train_and_evaluate", preempted)
    cfg = with_values(base_config(), {"model.name": "vit_ti16", "model.image_size": 28, "model.patch_size": 4,
                                      "model.depth": 1, "train.progress": False})
    cfg.benchmark = hpo.benchmark_section(methods="linear,full", models="vit_ti16", datasets="breastmnist",
                                          fractions="1.0", seeds="0,1")
    cfg.lock()
    with pytest.raises(Preempted):
        grid.run_grid(cfg, tmp_path / "work")
    assert len(calls) == 1  # the next runs wait for the rerun, which continues the preempted one
