"""Classification metrics on host arrays: macro-F1 (the paper's score), accuracy,
balanced accuracy, AUROC (one-vs-rest macro for several classes) and expected
calibration error. Written out so that no metric depends on an extra library."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean over classes present in labels or predictions of 2TP / (2TP + FP + FN)."""
    m = confusion(labels, preds, num_classes)
    tp = np.diag(m).astype(np.float64)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def majority_baseline(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Scores of always predicting the most frequent class of ``labels``: the floor a table should beat."""
    majority = int(np.bincount(labels, minlength=num_classes).argmax())
    preds = np.full_like(labels, majority)
    return {"macro_f1": macro_f1(labels, preds, num_classes), "accuracy": float(np.mean(labels == majority))}


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    m = confusion(labels, preds, num_classes)
    support = m.sum(axis=1)
    present = support > 0
    return float((np.diag(m)[present] / support[present]).mean())


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney U statistic with average ranks for ties; NaN if one class is absent."""
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    i = 0
    while i < len(scores):  # average ranks over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of class 1, or the macro one-vs-rest AUROC over classes present."""
    if probs.shape[1] == 2:
        return binary_auroc(labels == 1, probs[:, 1])
    values = [binary_auroc(labels == k, probs[:, k]) for k in range(probs.shape[1]) if (labels == k).any()]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> float:
    """Confidence-binned |accuracy - confidence|, weighted by bin size (Guo et al. 2017)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels).astype(np.int64)
    logits = np.asarray(logits, np.float64)
    num_classes = logits.shape[1]
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    nll = -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean()
    return {
        "macro_f1": macro_f1(labels, preds, num_classes),
        "accuracy": float((preds == labels).mean()),
        "balanced_accuracy": balanced_accuracy(labels, preds, num_classes),
        "auroc": auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "loss": float(nll),
        "num_examples": int(len(labels)),
    }


def subgroup_metrics(labels: np.ndarray, logits: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per-subgroup macro-F1 and accuracy, for fairness reports (e.g. by skin type or sex)."""
    report: dict[str, dict] = {}
    for field, values in groups.items():
        values = np.asarray(values)
        per_value = {}
        for v in np.unique(values):
            sel = values == v
            m = classification_metrics(labels[sel], logits[sel])
            per_value[str(v)] = {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "n": int(sel.sum())}
        f1s = [x["macro_f1"] for x in per_value.values()]
        report[field] = {"groups": per_value, "gap": float(max(f1s) - min(f1s)) if f1s else 0.0}
    return report
