"""Metrics against scikit-learn, and early stopping in the loop."""
import numpy as np
import pytest
from sklearn import metrics as skm

from peft_jax.metrics import classification as metrics


@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_match_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, size=300)
    logits = rng.normal(size=(300, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    logits[:20] = np.round(logits[:20])  # ties in the scores
    m = metrics.classification_metrics(labels, logits)
    probs = metrics.softmax(logits)
    preds = probs.argmax(1)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    expected_auc = (skm.roc_auc_score(labels, probs[:, 1]) if num_classes == 2
                    else skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["auroc"] == pytest.approx(expected_auc)
    assert m["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=list(range(num_classes))))


def test_ece_of_perfectly_calibrated_and_overconfident():
    labels = np.array([0, 1] * 50)
    confident_right = np.where(np.eye(2)[labels] > 0, 10.0, -10.0)
    assert metrics.expected_calibration_error(labels, metrics.softmax(confident_right)) < 1e-3
    confident_wrong = -confident_right
    assert metrics.expected_calibration_error(labels, metrics.softmax(confident_wrong)) > 0.99


def test_macro_f1_counts_classes_never_predicted():
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 0, 0, 0])
    assert metrics.macro_f1(labels, preds, 2) == pytest.approx(skm.f1_score(labels, preds, average="macro"))


def test_subgroup_gap():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    logits = np.stack([labels == 0, labels == 1], 1).astype(float) * 5
    logits[4:] = logits[4:, ::-1]  # group "b" all wrong
    report = metrics.subgroup_metrics(labels, logits, {"sex": np.array(["a"] * 4 + ["b"] * 4)})
    assert report["sex"]["groups"]["a"]["accuracy"] == 1.0 and report["sex"]["groups"]["b"]["accuracy"] == 0.0
    assert report["sex"]["gap"] == pytest.approx(1.0)


def test_early_stopping_ends_the_run(shared_data, tmp_path):
    from peft_jax.config import base_config
    from peft_jax.train import classify

    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 28, 4, 2
    # A learning rate of 0 never improves on the first evaluation: stop after `patience` more.
    cfg.train.update(num_steps=100, batch_size=16, eval_every=2, patience=3, lr=0.0, progress=False)
    result = classify.train_and_evaluate(cfg, tmp_path)
    assert result["stopped_early"] and result["best_step"] == 2 and result["steps_run"] == 8
