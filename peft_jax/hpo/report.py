"""Benchmark outputs: ``results.csv`` (one row per final run), ``report.md`` (tables shaped like
Dutt et al.'s: methods as rows, datasets as columns) and PNG plots."""
from __future__ import annotations

import csv
import json
import math
import pathlib
from collections import defaultdict
from typing import Any

import numpy as np

from peft_jax.files import read_json
from peft_jax.hpo import findings

COLUMNS = ["model", "dataset", "method", "data_fraction", "seed", "test_macro_f1", "test_accuracy",
           "test_balanced_accuracy", "test_auroc", "test_ece", "val_macro_f1", "trainable_params", "total_params",
           "trainable_percent", "best_step", "steps_run", "train_examples", "wall_seconds", "hparams", "run_dir"]


def rows_from_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """CSV rows of the finished runs and the list of failed ones."""
    rows, failed = [], []
    for rec in records:
        cell = rec["cell"]
        if "error" in rec:
            failed.append({"model": cell.model, "dataset": cell.dataset, "method": cell.method,
                           "data_fraction": cell.fraction, "seed": rec["seed"], "error": rec["error"]})
            continue
        run_dir = pathlib.Path(rec["run_dir"])
        fix = f"delete {run_dir} and rerun the command to train it again"
        r, wall = read_json(run_dir / "results.json", fix), read_json(run_dir / "wall.json", fix)["wall_seconds"]
        row = {"model": cell.model, "dataset": cell.dataset, "method": cell.method, "data_fraction": cell.fraction,
               "seed": rec["seed"], "val_macro_f1": r["val"].get("macro_f1"), "wall_seconds": round(wall, 1),
               "hparams": json.dumps(rec["hparams"], sort_keys=True), "run_dir": str(run_dir)}
        for k in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "ece"):
            row[f"test_{k}"] = r["test"][k]
        for k in ("trainable_params", "total_params", "trainable_percent", "best_step", "steps_run",
                  "train_examples"):
            row[k] = r[k]
        row["subgroups"] = r["test"].get("subgroups")  # kept for the fairness table, not a CSV column
        rows.append(row)
    return rows, failed


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _order(values) -> list:
    return list(dict.fromkeys(values))


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _percent(p: float) -> str:
    return f"{p:.3g}" if p < 1 else f"{p:.1f}"


def results_tables(rows: list[dict], reference: str = "full") -> str:
    """One table per (model, data fraction): mean ± std test macro-F1 over seeds, best per column in bold."""
    by = _group(rows, "model", "data_fraction", "method", "dataset")
    out = []
    for model in _order(r["model"] for r in rows):
        for fraction in sorted(set(r["data_fraction"] for r in rows if r["model"] == model)):
            sub = [r for r in rows if r["model"] == model and r["data_fraction"] == fraction]
            methods, datasets = _order(r["method"] for r in sub), _order(r["dataset"] for r in sub)
            stats = {(m, d): _mean_std([r["test_macro_f1"] for r in by[(model, fraction, m, d)]])
                     for m in methods for d in datasets if by[(model, fraction, m, d)]}
            best = {d: max((stats[(m, d)][0] for m in methods if (m, d) in stats), default=None) for d in datasets}
            average = {m: float(np.mean([stats[(m, d)][0] for d in datasets])) for m in methods
                       if all((m, d) in stats for d in datasets)}
            seeds = max(len(v) for v in by.values() if v)
            out.append(f"### {model}, {fraction:.0%} of the training labels\n")
            header = ["method", "trainable %", *datasets, "mean"]
            if reference in average:
                header.append(f"Δ vs {reference}")
            out.append("| " + " | ".join(header) + " |")
            out.append("|---|" + "---:|" * (len(header) - 1))
            best_mean = max(average.values(), default=None)
            for m in methods:
                percent = _first(sub, m)["trainable_percent"]
                cells = [m, _percent(percent)]
                for d in datasets:
                    if (m, d) not in stats:
                        cells.append("–")
                        continue
                    mean, std = stats[(m, d)]
                    text = f"{mean:.3f} ± {std:.3f}"
                    cells.append(f"**{text}**" if math.isclose(mean, best[d]) else text)
                if m in average:
                    text = f"{average[m]:.3f}"
                    cells.append(f"**{text}**" if math.isclose(average[m], best_mean) else text)
                    if reference in average:
                        cells.append(f"{average[m] - average[reference]:+.3f}")
                else:
                    cells += ["–"] * (2 if reference in average else 1)
                out.append("| " + " | ".join(cells) + " |")
            out.append(f"\nTest macro-F1, mean ± sample std over up to {seeds} seeds; bold: best in the column.\n")
    return "\n".join(out)


def _first(rows: list[dict], method: str) -> dict:
    return next(r for r in rows if r["method"] == method)


MIN_GROUP_SIZE = 10  # the default smallest subgroup (test images) that enters a gap


def _group_sizes(runs: list[dict], field: str) -> dict[str, int | None]:
    """Test images per subgroup (the same test set in every run; None where a result predates ``n``)."""
    sizes: dict[str, int | None] = {}
    for r in runs:
        for g, m in r["subgroups"].get(field, {}).get("groups", {}).items():
            sizes[g] = m.get("n") if sizes.get(g) is None else sizes[g]
    return sizes


def _interval(values: list[float], n: int | None) -> tuple[float, float, float] | None:
    """Mean macro-F1 over seeds and a 95% normal interval: the test images' sampling noise, treating the
    score as a proportion over the subgroup's n images (shared by every seed), plus the seeds' spread."""
    if not values or not n:
        return None
    a = np.asarray(values, np.float64)
    mean = float(a.mean())
    seeds = float(a.var(ddof=1)) / len(a) if len(a) > 1 else 0.0
    half = 1.96 * math.sqrt(mean * (1.0 - mean) / n + seeds)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def fairness_tables(rows: list[dict], min_group_size: int = MIN_GROUP_SIZE) -> str:
    """Per-subgroup test macro-F1 (mean over seeds, 95% interval, n) and the best-worst gap, where results
    carry subgroups. The gap runs over the subgroups with at least ``min_group_size`` test images; the
    others are shown but named as left out (a subgroup of one image scores 0 or 1)."""
    out = []
    with_groups = [r for r in rows if r.get("subgroups")]
    for (model, dataset, fraction), sub in _group(with_groups, "model", "dataset", "data_fraction").items():
        for field in _order(f for r in sub for f in r["subgroups"]):
            sizes = _group_sizes(sub, field)
            groups = list(sizes)
            counted = [g for g in groups if (sizes[g] or 0) >= min_group_size]
            out.append(f"### {dataset}, {model}, {fraction:.0%} of the labels: macro-F1 by {field}\n")
            out.append("| method | " + " | ".join(f"{g} (n={sizes[g] if sizes[g] is not None else '?'})"
                                                  for g in groups) + " | gap |")
            out.append("|---|" + "---:|" * (len(groups) + 1))
            for method, runs in _group(sub, "method").items():
                cells, means = [method[0]], {}
                for g in groups:
                    values = [r["subgroups"][field]["groups"][g]["macro_f1"] for r in runs
                              if g in r["subgroups"].get(field, {}).get("groups", {})]
                    shown = _interval(values, sizes[g])
                    if values:
                        means[g] = float(np.mean(values))
                    cells.append("–" if not values else f"{means[g]:.3f}" if shown is None
                                 else f"{shown[0]:.3f} [{shown[1]:.2f}, {shown[2]:.2f}]")
                gap = [means[g] for g in counted if g in means]
                cells.append(f"{max(gap) - min(gap):.3f}" if len(gap) > 1 else "–")
                out.append("| " + " | ".join(cells) + " |")
            left_out = [f"{g} (n={sizes[g] if sizes[g] is not None else '?'})" for g in groups if g not in counted]
            out.append(f"\nMean over seeds [95% interval: the subgroup's test-sampling noise, as a proportion over "
                       f"its n images, and the seeds' spread]. Gap: best minus worst mean over the subgroups with "
                       f"at least {min_group_size} test images"
                       + (f"; left out: {', '.join(left_out)}.\n" if left_out else ".\n"))
    return "\n".join(out)


def _explanations(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(row, explanations.json) of the runs that have one (``benchmark.explain_images``)."""
    out = []
    for r in rows:
        path = pathlib.Path(r["run_dir"]) / "explanations.json"
        if path.is_file():
            out.append((r, read_json(path, "delete it and rerun the command to explain the run again")))
    return out


def _seed_averaged(runs: list[dict], attribution: str, score: str) -> list[float]:
    """Per-image scores averaged over the seeds of a cell: the runs that explained the first run's images
    (all of them, unless ``explain_images`` changed between runs)."""
    ids = [im["id"] for im in runs[0]["images"]]
    runs = [e for e in runs if [im["id"] for im in e["images"]] == ids]
    per_seed = np.array([[np.nan if v is None else v for v in e["attributions"][attribution]["per_image"][score]]
                         for e in runs], np.float64)
    with np.errstate(invalid="ignore"):
        return [float(v) if np.isfinite(v) else None for v in np.nanmean(per_seed, axis=0)] if len(per_seed) else []


def explanation_tables(rows: list[dict]) -> str:
    """Per (model, dataset, attribution method): PEFT method x data fraction, the share of positive
    attribution on the lesion mask and the pointing game, each with a 95% bootstrap interval over images."""
    from peft_jax.explain import scores

    found = _explanations(rows)
    out = []
    for (model, dataset), sub in _group([{**r, "e": e} for r, e in found], "model", "dataset").items():
        fractions = sorted(set(r["data_fraction"] for r in sub))
        for attribution in _order(a for r in sub for a in r["e"]["attributions"]):
            out.append(f"### {dataset}, {model}: {attribution}, {sub[0]['e']['split']} images\n")
            out.append("| method | " + " | ".join(f"{f:.0%} energy | {f:.0%} pointing" for f in fractions) + " |")
            out.append("|---|" + "---:|" * (2 * len(fractions)))
            for method, runs in _group(sub, "method").items():
                cells = [method[0]]
                for f in fractions:
                    cell = [r["e"] for r in runs if r["data_fraction"] == f and attribution in r["e"]["attributions"]]
                    for score in ("energy", "pointing"):
                        ci = scores.bootstrap_ci(_seed_averaged(cell, attribution, score)) if cell else {"n": 0}
                        cells.append(f"{ci['mean']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
                                     if ci["n"] else "–")
                out.append("| " + " | ".join(cells) + " |")
            chance = np.mean([r["e"]["chance"]["mean"] for r in sub])
            out.append(f"\nMean over seeds per image, 95% bootstrap interval over the {sub[0]['e']['chance']['n']} "
                       f"images; a map spread evenly scores the mask's area ({chance:.3f}) on energy.\n")
    return "\n".join(out)


def _energy_gain(runs: list[dict], reference_runs: list[dict], attribution: str) -> str:
    """One cell: the seed-averaged mask energy of ``runs`` minus the reference's, image by image on the same
    images, with a 95% bootstrap interval over the images."""
    from peft_jax.explain import scores

    runs, base = ([r["e"] for r in group if attribution in r["e"]["attributions"]] for group in (runs, reference_runs))
    if not runs or not base or [im["id"] for im in runs[0]["images"]] != [im["id"] for im in base[0]["images"]]:
        return "–"
    ours, theirs = (np.array(_seed_averaged(group, attribution, "energy"), np.float64) for group in (runs, base))
    ci = scores.bootstrap_ci(ours - theirs)
    return findings.gain_text({"diff": ci["mean"], "low": ci["ci_low"], "high": ci["ci_high"]}) if ci["n"] else "–"


def explanation_gains(rows: list[dict], reference: str = "full") -> str:
    """Per (model, dataset): each method's mask energy minus the reference's on the same test images, per data
    fraction and attribution method: whether PEFT looks at the lesion more or less than full fine-tuning."""
    out = []
    for (model, dataset), sub in _group([{**r, "e": e} for r, e in _explanations(rows)], "model", "dataset").items():
        cells = _group(sub, "method", "data_fraction")
        columns = [(f, a) for f in sorted(set(r["data_fraction"] for r in sub))
                   for a in _order(a for r in sub for a in r["e"]["attributions"])]
        methods = [m for m in _order(r["method"] for r in sub) if m != reference]
        if not methods or not any(m == reference for m, _ in cells):
            continue
        out.append(f"### {dataset}, {model}: mask energy minus {reference}'s\n")
        out.append("| method | " + " | ".join(f"{f:.0%} {a}" for f, a in columns) + " |")
        out.append("|---|" + "---:|" * len(columns))
        for m in methods:
            gains = [_energy_gain(cells.get((m, f), []), cells.get((reference, f), []), a) for f, a in columns]
            out.append(f"| {m} | " + " | ".join(gains) + " |")
        out.append(f"\nPer image: the energy averaged over seeds minus {reference}'s on the same image; mean and 95% "
                   "bootstrap interval over the images; `*`: the interval excludes 0 (positive: more of the "
                   "attribution on the lesion than the reference).\n")
    return "\n".join(out)


def plot_explanations(rows: list[dict], path: pathlib.Path, num_images: int = 6) -> bool:
    """The first explained (model, dataset, fraction): one row per PEFT method (its first seed), the same test
    images, Grad-CAM (or the first attribution method) over the image with the mask outline."""
    from peft_jax.explain import overlay

    found = _explanations(rows)
    if not found:
        return False
    first = found[0][0]
    group = [(r, e) for r, e in found if (r["model"], r["dataset"], r["data_fraction"]) ==
             (first["model"], first["dataset"], first["data_fraction"])]
    methods = found[0][1]["attributions"]
    attribution = "gradcam" if "gradcam" in methods else next(iter(methods))
    panels = []
    for method in _order(r["method"] for r, _ in group):
        run_dir = next(pathlib.Path(r["run_dir"]) for r, _ in group if r["method"] == method)
        with np.load(run_dir / "explanations" / "thumbnails.npz") as t:
            if attribution in t:
                panels.append((method, t["images"][:num_images], t[attribution][:num_images].astype(np.float32),
                               t["masks"][:num_images]))
    overlay.comparison_figure(path, panels, f"{attribution} on the same {first['dataset']} test images, "
                                            f"{first['model']}, {first['data_fraction']:.0%} of the labels")
    return True


def write_report(rows: list[dict], failed: list[dict], out_dir: pathlib.Path, command: str,
                 config_text: str, reference: str = "full", min_group_size: int = MIN_GROUP_SIZE) -> None:
    total = sum(r["wall_seconds"] for r in rows)
    parts = [
        "# Benchmark report\n",
        f"Made by:\n\n```bash\n{command}\n```\n",
        f"{len(rows)} final runs ({len(failed)} failed), {total / 60:.1f} min of training wall time in all. "
        "One row per run is in `results.csv`.\n",
        "## Test macro-F1\n",
        results_tables(rows, reference),
    ]
    reading = findings.section(rows, reference)
    if reading:
        parts.append(reading)
    fairness = fairness_tables(rows, min_group_size)
    if fairness:
        parts += ["## Fairness: test macro-F1 per subgroup\n", fairness]
    explained = explanation_tables(rows)
    if explained:
        parts += ["## Where the models look: attribution on the lesion mask\n", explained,
                  explanation_gains(rows, reference),
                  "![attribution maps of each method on the same test images](explanations.png)\n"]
    if failed:
        parts += ["## Failed runs\n", "| model | dataset | method | fraction | seed | error |", "|---|---|---|---:|---:|---|"]
        parts += [f"| {f['model']} | {f['dataset']} | {f['method']} | {f['data_fraction']:g} | {f['seed']} | "
                  f"{f['error'].replace('|', '/')} |" for f in failed]
        parts.append("")
    parts += ["## Plots\n", "![macro-F1 against data fraction](f1_vs_fraction.png)\n",
              "![macro-F1 against trainable parameters](f1_vs_trainable.png)\n",
              "## Configuration\n", f"```\n{config_text}\n```\n"]
    (out_dir / "report.md").write_text("\n".join(parts))


def _panels(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _styles(methods: list[str]) -> dict[str, dict]:
    """Line style per method: ten colours, then the same colours dashed with another marker, so that a
    grid of twelve methods draws no two alike (matplotlib's cycle repeats after ten)."""
    return {m: {"color": f"C{i % 10}", "marker": "osD^"[i // 10 % 4], "linestyle": "-" if i < 10 else "--"}
            for i, m in enumerate(methods)}


def plot_f1_vs_fraction(rows: list[dict], path: pathlib.Path) -> None:
    """Test macro-F1 (mean ± std over seeds) against the data fraction, one line per method."""
    panels = _order((r["model"], r["dataset"]) for r in rows)
    plt, fig, axes = _panels(len(panels))
    styles = _styles(_order(r["method"] for r in rows))  # one style per method across the panels
    for ax, (model, dataset) in zip(axes, panels):
        sub = [r for r in rows if r["model"] == model and r["dataset"] == dataset]
        for method in _order(r["method"] for r in sub):
            fractions = sorted(set(r["data_fraction"] for r in sub if r["method"] == method))
            stats = [_mean_std([r["test_macro_f1"] for r in sub if r["method"] == method
                                and r["data_fraction"] == f]) for f in fractions]
            ax.errorbar([100 * f for f in fractions], [s[0] for s in stats], yerr=[s[1] for s in stats],
                        capsize=3, label=method, **styles[method])
        ax.set_xscale("log")
        ax.set_xlabel("training labels used (%)")
        ax.set_ylabel("test macro-F1")
        ax.set_title(f"{dataset}, {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_f1_vs_trainable(rows: list[dict], path: pathlib.Path) -> None:
    """Test macro-F1 against the trainable share of parameters (log scale), one panel per dataset and fraction."""
    panels = _order((r["model"], r["dataset"], r["data_fraction"]) for r in rows)
    plt, fig, axes = _panels(len(panels))
    styles = _styles(_order(r["method"] for r in rows))
    for ax, (model, dataset, fraction) in zip(axes, panels):
        sub = [r for r in rows if (r["model"], r["dataset"], r["data_fraction"]) == (model, dataset, fraction)]
        for method in _order(r["method"] for r in sub):
            runs = [r for r in sub if r["method"] == method]
            mean, std = _mean_std([r["test_macro_f1"] for r in runs])
            ax.errorbar([runs[0]["trainable_percent"]], [mean], yerr=[std], capsize=3, label=method,
                        **styles[method])
            ax.annotate(method, (runs[0]["trainable_percent"], mean), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (%)")
        ax.set_ylabel("test macro-F1")
        ax.set_title(f"{dataset}, {model}, {fraction:.0%} of the labels")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(records: list[dict], out_dir: pathlib.Path, command: str, config_text: str,
              reference: str = "full", min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """Writes results.csv, report.md and the two plots into ``out_dir``; returns a small summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = rows_from_records(records)
    write_csv(rows, out_dir / "results.csv")
    write_report(rows, failed, out_dir, command, config_text, reference, min_group_size)
    if rows:
        plot_f1_vs_fraction(rows, out_dir / "f1_vs_fraction.png")
        plot_f1_vs_trainable(rows, out_dir / "f1_vs_trainable.png")
        plot_explanations(rows, out_dir / "explanations.png")
    return {"runs": len(rows), "failed": len(failed), "out_dir": str(out_dir)}
