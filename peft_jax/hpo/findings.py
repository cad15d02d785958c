"""The written reading of a benchmark: is PEFT better than the reference (full fine-tuning), by how
much, where do they cross, which method is best, and how does the trainable share relate to the gain.

Every comparison is paired (same seed, same test images) with a two-level bootstrap interval
(``peft_jax.hpo.paired``); "best PEFT method" is chosen on validation macro-F1, never on test.
"""
from __future__ import annotations

import json
import pathlib
from collections import defaultdict

import numpy as np

from peft_jax.errors import UserError
from peft_jax.hpo import paired
from peft_jax.metrics import classification as metrics_lib

NOT_PEFT = ("full", "scratch")


def _runs(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(dataset, fraction, method) -> seed -> row, for the rows whose predictions were kept."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    first: dict[str, tuple[str, np.ndarray]] = {}
    for r in rows:
        pred = paired.load_predictions(r["run_dir"])
        if pred is None:
            continue
        _check_same_test_set(first.setdefault(r["dataset"], (r["run_dir"], pred[0])), r, pred[0])
        out[(r["dataset"], r["data_fraction"], r["method"])][int(r["seed"])] = {**r, "labels": pred[0],
                                                                              "preds": pred[1]}
    return out


def _check_same_test_set(first: tuple[str, np.ndarray], row: dict, labels: np.ndarray) -> None:
    """Pairing compares predictions image by image. Runs made before and after the dataset was prepared
    again from other files may hold other test images; their labels then differ (a necessary sign)."""
    if not np.array_equal(first[1], labels):
        raise UserError(
            f"{row['run_dir']} was tested on other {row['dataset']} test images than {first[0]} (their test "
            "labels differ), so the two cannot be paired: the dataset was prepared again from other files "
            "between those runs. Delete the runs made with the old files and rerun the benchmark on the same "
            "workdir (it reruns only those)")


def _num_classes(row: dict) -> int:
    return len(json.loads((pathlib.Path(row["run_dir"]) / "results.json").read_text())["class_names"])


def _compare(runs: dict, key_a: tuple, key_b: tuple, seed: int) -> dict | None:
    common = sorted(set(runs.get(key_a, {})) & set(runs.get(key_b, {})))
    if not common:
        return None
    a, b = runs[key_a], runs[key_b]
    labels = a[common[0]]["labels"]
    return paired.paired_difference(labels, [a[s]["preds"] for s in common], [b[s]["preds"] for s in common],
                                    _num_classes(a[common[0]]), seed=seed)


def gain_text(d: dict) -> str:
    """A difference with its interval, ``+0.064 [+0.026, +0.104]*``; ``*`` when the interval excludes 0."""
    star = "*" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}"


def majority_table(runs: dict) -> str:
    lines = ["| dataset | test images | classes | majority-class macro-F1 | majority-class accuracy |",
             "|---|---:|---:|---:|---:|"]
    seen = set()
    for (dataset, _, _), by_seed in runs.items():
        if dataset in seen:
            continue
        seen.add(dataset)
        row = next(iter(by_seed.values()))
        k = _num_classes(row)
        base = metrics_lib.majority_baseline(row["labels"], k)
        lines.append(f"| {dataset} | {len(row['labels'])} | {k} | {base['macro_f1']:.3f} | {base['accuracy']:.3f} |")
    return "\n".join(lines)


def gain_table(runs: dict, reference: str) -> str:
    """Every method's paired macro-F1 gain over the reference, per dataset and fraction."""
    datasets = list(dict.fromkeys(k[0] for k in runs))
    out = []
    for dataset in datasets:
        fractions = sorted({k[1] for k in runs if k[0] == dataset})
        methods = [m for m in dict.fromkeys(k[2] for k in runs if k[0] == dataset) if m != reference]
        out += [f"#### {dataset}\n", "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
                "|---|" + "---:|" * len(fractions)]
        for m in methods:
            cells = []
            for i, f in enumerate(fractions):
                d = _compare(runs, (dataset, f, m), (dataset, f, reference), seed=i)
                cells.append(gain_text(d) if d else "–")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _mean(values) -> float:
    return float(np.mean(list(values)))


def best_peft_table(runs: dict, reference: str) -> tuple[str, list[dict]]:
    """Per dataset and fraction: the PEFT method with the best mean validation macro-F1 against the reference."""
    lines = [f"| dataset | fraction | best PEFT (by validation) | its test macro-F1 | {reference} test macro-F1 | "
             "paired gain [95% CI] |", "|---|---:|---|---:|---:|---:|"]
    found = []
    for dataset, fraction in dict.fromkeys((k[0], k[1]) for k in runs):
        peft = {k[2]: v for k, v in runs.items() if k[:2] == (dataset, fraction) and k[2] not in NOT_PEFT}
        if not peft or (dataset, fraction, reference) not in runs:
            continue
        best = max(peft, key=lambda m: _mean(r["val_macro_f1"] for r in peft[m].values()))
        d = _compare(runs, (dataset, fraction, best), (dataset, fraction, reference), seed=7)
        ref_f1 = _mean(r["test_macro_f1"] for r in runs[(dataset, fraction, reference)].values())
        best_f1 = _mean(r["test_macro_f1"] for r in peft[best].values())
        lines.append(f"| {dataset} | {fraction:.0%} | {best} | {best_f1:.3f} | {ref_f1:.3f} | {gain_text(d)} |")
        found.append({"dataset": dataset, "fraction": fraction, "method": best, **d})
    return "\n".join(lines), found


def crossover_lines(found: list[dict]) -> list[str]:
    """Where the best PEFT method stops beating the reference, per dataset."""
    lines = []
    for dataset in dict.fromkeys(f["dataset"] for f in found):
        sub = sorted((f for f in found if f["dataset"] == dataset), key=lambda f: f["fraction"])
        signs = ", ".join(f"{f['fraction']:.0%}: {f['diff']:+.3f}" for f in sub)
        losing = [f["fraction"] for f in sub if f["diff"] <= 0]
        where = f"the reference is at least as good from {losing[0]:.0%} of the labels" if losing else \
            "the best PEFT method is ahead at every fraction"
        lines.append(f"- {dataset}: {where} ({signs}).")
    return lines


def rank_table(rows: list[dict]) -> str:
    """Mean rank of every method (1 = best test macro-F1, mean over seeds) across the dataset x fraction cells."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[(r["dataset"], r["data_fraction"])][r["method"]].append(r["test_macro_f1"])
    ranks: dict[str, list[float]] = defaultdict(list)
    for by_method in cells.values():
        means = {m: np.mean(v) for m, v in by_method.items()}
        order = sorted(means, key=lambda m: -means[m])
        for i, m in enumerate(order):
            ranks[m].append(i + 1)
    lines = ["| method | mean rank | cells |", "|---|---:|---:|"]
    for m in sorted(ranks, key=lambda m: np.mean(ranks[m])):
        lines.append(f"| {m} | {np.mean(ranks[m]):.2f} | {len(ranks[m])} |")
    return "\n".join(lines)


def trainable_correlation(rows: list[dict], reference: str) -> list[str]:
    """Spearman correlation between a PEFT method's trainable share and its gain over the reference, per fraction."""
    from scipy.stats import spearmanr

    lines = []
    for fraction in sorted({r["data_fraction"] for r in rows}):
        points = []
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            sub = [r for r in rows if r["dataset"] == dataset and r["data_fraction"] == fraction]
            ref = [r["test_macro_f1"] for r in sub if r["method"] == reference]
            if not ref:
                continue
            for m in dict.fromkeys(r["method"] for r in sub if r["method"] not in NOT_PEFT):
                runs = [r for r in sub if r["method"] == m]
                points.append((runs[0]["trainable_percent"], _mean(r["test_macro_f1"] for r in runs) - np.mean(ref)))
        if len(points) >= 3:
            rho, p = spearmanr([x for x, _ in points], [y for _, y in points])
            lines.append(f"- {fraction:.0%} of the labels: Spearman rho {rho:+.2f} (p = {p:.2f}) over {len(points)} "
                         "(method, dataset) points")
    return lines


def section(rows: list[dict], reference: str = "full") -> str:
    """The report's findings section ('' when no run kept its test predictions)."""
    runs = _runs(rows)
    if not runs:
        return ""
    best, found = best_peft_table(runs, reference)
    parts = ["## Findings (paired comparisons)\n",
             "Intervals: 95% two-level bootstrap (test images and seeds resampled; 1000 replicates) of the "
             "difference in test macro-F1 between two methods trained with the same seeds; `*`: the interval "
             "excludes 0.\n", "### Majority-class baseline\n", majority_table(runs), "",
             f"### Best PEFT method vs {reference}\n", best, "", "### Where they cross\n", *crossover_lines(found), "",
             f"### Every method's gain over {reference}\n", gain_table(runs, reference),
             "### Mean rank over the dataset x fraction cells\n", rank_table(rows), "",
             f"### Trainable share vs gain over {reference}\n", *trainable_correlation(rows, reference), ""]
    return "\n".join(parts)
