"""Paired statistics, epoch budgets and the findings section of the benchmark report."""
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

pytest.importorskip("optuna", reason="the hpo extra: pip install -e '.[hpo]'")
from peft_jax import hpo  # noqa: E402
from peft_jax.config import base_config  # noqa: E402
from peft_jax.errors import UserError  # noqa: E402
from peft_jax.hpo import findings, grid, paired  # noqa: E402
from peft_jax.metrics import classification as metrics_lib  # noqa: E402


def test_macro_f1_equals_the_results_score_and_sklearn():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 300), rng.integers(0, 3, 300)  # class 3 is never predicted
    want = f1_score(labels, preds, average="macro", zero_division=0)
    assert paired.macro_f1(labels, preds, 5) == pytest.approx(want, abs=1e-12)  # class 4: absent, not counted
    assert paired.macro_f1(labels, preds, 5) == pytest.approx(metrics_lib.macro_f1(labels, preds, 5), abs=1e-12)
    weights = np.stack([np.bincount(rng.integers(0, 300, 300), minlength=300) for _ in range(3)]).astype(float)
    for w, got in zip(weights, paired.macro_f1(labels, preds, 4, weights)):
        idx = np.repeat(np.arange(300), w.astype(int))
        assert got == pytest.approx(f1_score(labels[idx], preds[idx], average="macro", zero_division=0), abs=1e-12)


def test_majority_baseline():
    labels = np.array([0] * 30 + [1] * 10)
    base = metrics_lib.majority_baseline(labels, 2)
    assert base["accuracy"] == 0.75
    assert base["macro_f1"] == pytest.approx((2 * 30 / (30 + 40)) / 2)  # F1 of class 0 = 2*30/(30+40); class 1: 0


def test_paired_difference_detects_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    noisy = [np.where(rng.random(400) < 0.35, 1 - labels, labels) for _ in range(3)]
    better = [np.where(rng.random(400) < 0.15, 1 - labels, labels) for _ in range(3)]
    gain = paired.paired_difference(labels, better, noisy, 2, num_samples=500)
    assert gain["low"] > 0.1 and gain["p_below_zero"] == 0.0 and gain["seeds"] == 3
    same = paired.paired_difference(labels, noisy, noisy, 2, num_samples=200)
    assert same["diff"] == same["low"] == same["high"] == 0.0
    null = paired.paired_difference(labels, noisy, [np.where(rng.random(400) < 0.35, 1 - labels, labels)
                                                   for _ in range(3)], 2, num_samples=500)
    assert null["low"] < 0 < null["high"]
    with pytest.raises(ValueError, match="paired by seed"):
        paired.paired_difference(labels, noisy, noisy[:2], 2)


def test_epoch_budget_scales_with_the_training_set_and_keeps_its_bounds():
    cfg = base_config()
    cfg.benchmark = hpo.benchmark_section(methods="linear", models="vit_ti16", datasets="breastmnist",
                                          fractions="0.1", seeds="0")
    assert grid.budget(cfg, 32, 1000) == {}  # budgets in steps unless epochs are given
    cfg.benchmark.epochs, cfg.benchmark.min_steps, cfg.benchmark.max_steps = 10.0, 50, 400
    assert grid.budget(cfg, 32, 640)["train.num_steps"] == 200
    assert grid.budget(cfg, 32, 5)["train.num_steps"] == 50
    big = grid.budget(cfg, 32, 100_000)
    assert big == {"train.num_steps": 400, "train.eval_every": 40, "train.checkpoint_every": 40,
                   "train.log_every": 40, "train.warmup_steps": 40}


def _fake_run(tmp_path, name, labels, preds, val, seed, method, fraction, percent):
    run = tmp_path / name
    run.mkdir()
    logits = np.eye(2)[preds]
    np.savez(run / "test_predictions.npz", labels=labels, logits=logits)
    (run / "results.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    return {"dataset": "d", "data_fraction": fraction, "method": method, "seed": seed, "run_dir": str(run),
            "val_macro_f1": val, "test_macro_f1": float(paired.macro_f1(labels, preds, 2)),
            "trainable_percent": percent, "model": "m"}


def test_findings_section_picks_the_best_peft_method_by_validation(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 300)
    rows = []
    for seed in range(3):
        for method, flip, val, percent in (("full", 0.3, 0.70, 100.0), ("ssf", 0.1, 0.90, 0.5),
                                           ("bitfit", 0.05, 0.60, 0.1)):
            preds = np.where(rng.random(300) < flip, 1 - labels, labels)
            rows.append(_fake_run(tmp_path, f"{method}{seed}", labels, preds, val, seed, method, 0.1, percent))
    text = findings.section(rows, "full")
    assert "| d | 300 | 2 |" in text  # the majority-class row
    best_row = next(line for line in text.splitlines() if line.startswith("| d | 10% |"))
    assert "| ssf |" in best_row and best_row.endswith("]* |")  # ssf (best on validation, not bitfit) clearly wins
    assert "the best PEFT method is ahead at every fraction" in text
    assert findings.section([{**rows[0], "run_dir": str(tmp_path / "none")}], "full") == ""


def test_findings_refuse_to_pair_runs_tested_on_other_images(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    other = labels.copy()
    other[:10] = 1 - other[:10]  # the same size, other images: as after preparing the dataset from other files
    rows = [_fake_run(tmp_path, "full0", labels, labels, 0.7, 0, "full", 0.1, 100.0),
            _fake_run(tmp_path, "ssf0", other, other, 0.8, 0, "ssf", 0.1, 0.5)]
    with pytest.raises(UserError, match="ssf0 was tested on other d test images than .*full0"):
        findings.section(rows, "full")
    rows[1] = _fake_run(tmp_path, "ssf1", labels, other, 0.8, 0, "ssf", 0.1, 0.5)  # same images: pairs
    assert "| d | 10% |" in findings.section(rows, "full")


def test_report_plots_draw_twelve_methods_in_twelve_styles():
    from peft_jax.hpo import report

    methods = "linear,full,bitfit,bn_tune,film,ssf,tsa,residual_adapter,lora_conv,conv_adapter,partial,scratch"
    styles = report._styles(methods.split(","))
    drawn = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(drawn) == 12  # matplotlib's own cycle draws linear and partial, full and scratch alike
    assert styles["linear"]["color"] == styles["partial"]["color"] and styles["partial"]["linestyle"] == "--"
