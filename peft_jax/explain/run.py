"""Explain a finished run: where does its model look on test images, scored against lesion masks.

``explain_run(workdir)`` (behind ``launch/explain.py``) rebuilds the run's model the way training
built it (``peft_jax.train.builder.build``: the seeded or pre-trained base, the PEFT surgery) and
loads its ``adapter/``, takes ``num_images`` test images (the same ones for every run of a
dataset: a fixed-seed draw) in their evaluation view, explains the predicted class of each and
writes into the workdir:

- ``explanations.json``: per attribution method the mean score and bootstrap interval over images
  (``energy``, ``pointing``, ``auroc``; see ``scores``), the per-image scores, the images (id,
  label, prediction) and the chance level (the mean mask area, what a uniform map would score);
- ``explanations/<method>.png``: grids of image and heat map with the mask outline;
- ``explanations/thumbnails.npz``: the images, masks and maps at up to THUMBNAIL pixels, for
  the benchmark report's comparison figure.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time

import ml_collections
import numpy as np

from peft_jax.errors import UserError
from peft_jax.explain import attribution, overlay, scores
from peft_jax.explain.masks import DatasetMasks
from peft_jax.files import read_json

SELECTION_SEED = 0  # the test images explained: the same for every run of a dataset
BOOTSTRAP_SEED = 0
THUMBNAIL = 96
JSON_FILE = "explanations.json"
FOLDER = "explanations"


def finished_run(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The run's config, once it has finished (results.json and adapter/ written)."""
    for name in ("config.json", "results.json", "adapter/adapter_config.json"):
        if not (workdir / name).is_file():
            raise UserError(f"{workdir} is not a finished run: {name} is missing (train it to the end with "
                             "launch/train.py first)")
    return ml_collections.ConfigDict(read_json(workdir / "config.json", "train the run again"))


def load_model(cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
    """The trained model: base and surgery as training built them, then the run's adapter (hash-checked).

    Rematerialisation is switched off (it changes no weight or output, and hides attention weights)."""
    from peft_jax.adapters.io import load_adapter, read_adapter_config
    from peft_jax.train import builder

    meta = read_adapter_config(workdir / "adapter")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if "remat" in cfg.model:
        cfg.model.remat = False
    built = builder.build(cfg, len(meta["class_names"]))
    load_adapter(built.model, workdir / "adapter", built.trainable, base_hash=built.base_hash, peft_config=cfg.peft)
    built.model.eval()
    return built.model, list(meta["class_names"])


def test_images(cfg: ml_collections.ConfigDict, split: str, num_images: int):
    """(split subset, indices): ``num_images`` examples drawn with SELECTION_SEED, in split order."""
    from peft_jax.data import tfds_loader

    if split not in tfds_loader.SPLITS:
        raise UserError(f"--split must be one of {', '.join(tfds_loader.SPLITS)}, got {split!r}")
    d = cfg.dataset
    builder = tfds_loader.prepare(d.name, manual_dir=d.get("manual_dir"), data_dir=d.get("data_dir"),
                                  config=d.get("config"), skip_bad_files=bool(d.get("skip_bad_files", False)))
    full = tfds_loader.read_split(builder, split)
    if num_images < 1 or len(full) == 0:
        raise UserError(f"nothing to explain: --num_images={num_images}, the {split} split has {len(full)} examples")
    indices = np.sort(np.random.default_rng(SELECTION_SEED).permutation(len(full))[:num_images])
    return full.take(indices), indices


def eval_views(subset, masks: DatasetMasks, image_size: int, batch_size: int):
    """Normalised images (padded to whole batches) and their masks, both in the evaluation view."""
    from peft_jax.data import eval_batches

    batches = list(eval_batches(subset, batch_size=batch_size, image_size=image_size))
    images = np.concatenate([b["image"] for b in batches])
    mask_views = np.stack([masks.eval_view(subset.ids[i], subset.images[i].shape[:2], image_size)
                           for i in range(len(subset))])
    return images, mask_views


def _attribute(explainer: attribution.Explainer, method: str, images: np.ndarray, targets: np.ndarray,
               batch_size: int, count: int) -> np.ndarray:
    padded = np.zeros(len(images), np.int32)
    padded[:count] = targets
    maps = [explainer(method, images[i:i + batch_size], padded[i:i + batch_size])
            for i in range(0, len(images), batch_size)]
    return np.concatenate(maps)[:count]


def _thumbnail(a: np.ndarray) -> np.ndarray:
    step = max(1, int(np.ceil(a.shape[1] / THUMBNAIL)))
    return a[:, ::step, ::step]


def explain_run(workdir: str | pathlib.Path, *, split: str = "test", num_images: int = 16,
                methods: list[str] | None = None, ig_steps: int = attribution.IG_STEPS,
                baseline: str | float = "black", batch_size: int = 16, mask_dir: str | None = None) -> dict:
    """Explains a finished run; writes explanations.json and explanations/ into it and returns the json."""
    workdir = pathlib.Path(workdir)
    t0 = time.time()
    cfg = finished_run(workdir)
    masks = DatasetMasks(cfg.dataset, mask_dir)
    model, class_names = load_model(cfg, workdir)
    methods = _check_methods(model, cfg.model.name, methods)
    subset, indices = test_images(cfg, split, num_images)
    size = int(cfg.model.image_size)
    batch_size = min(batch_size, len(subset))
    images, mask_views = eval_views(subset, masks, size, batch_size)
    explainer = attribution.Explainer(model, ig_steps=ig_steps, baseline=baseline)
    count = len(subset)
    logits = np.concatenate([explainer.logits(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    predicted = logits[:count].argmax(axis=1)
    result = {"run": str(workdir), "split": split, "model": cfg.model.name, "method": cfg.peft.method,
              "dataset": cfg.dataset.name, "data_fraction": float(cfg.dataset.fraction), "seed": int(cfg.seed),
              "target": "predicted class", "ig_steps": int(ig_steps), "ig_baseline": baseline,
              "images": [{"id": str(subset.ids[k]), "index": int(indices[k]), "label": class_names[subset.labels[k]],
                          "predicted": class_names[predicted[k]], "mask_fraction": float(mask_views[k].mean())}
                         for k in range(count)],
              "chance": scores.bootstrap_ci(mask_views.reshape(count, -1).mean(axis=1), seed=BOOTSTRAP_SEED),
              "attributions": {}}
    display = overlay.display_image(images[:count])
    tmp = workdir / (FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    thumbnails = {"ids": subset.ids, "images": _thumbnail(display), "masks": _thumbnail(mask_views)}
    for method in methods:
        maps = _attribute(explainer, method, images, predicted, batch_size, count)
        per_image = {k: [] for k in scores.SCORES}
        for a, m in zip(maps, mask_views):
            for k, v in scores.image_scores(a, m).items():
                per_image[k].append(v if np.isfinite(v) else None)  # JSON has no NaN
        result["attributions"][method] = {**scores.summarize(per_image, seed=BOOTSTRAP_SEED), "per_image": per_image}
        captions = [caption(c, e) for c, e in zip(result["images"], per_image["energy"])]
        overlay.write_grid(tmp / f"{method}.png", display, maps, mask_views, captions)
        thumbnails[method] = _thumbnail(maps).astype(np.float16)
    np.savez_compressed(tmp / "thumbnails.npz", **thumbnails)
    result["seconds"] = round(time.time() - t0, 1)
    shutil.rmtree(workdir / FOLDER, ignore_errors=True)
    tmp.rename(workdir / FOLDER)
    (workdir / (JSON_FILE + ".tmp")).write_text(json.dumps(result, indent=1))
    (workdir / (JSON_FILE + ".tmp")).rename(workdir / JSON_FILE)
    return result


def caption(image: dict, energy: float | None) -> str:
    """An overlay's caption: short id, predicted class, mask energy (n/a for a map with no positive mass)."""
    return f"{image['id'][-7:]} {image['predicted']} E=" + ("n/a" if energy is None else f"{energy:.2f}")


def _check_methods(model, model_name: str, methods: list[str] | None) -> list[str]:
    """The requested methods (default: every one the model supports), each checked to apply."""
    if not methods:
        methods = attribution.supported_methods(model)
        if not methods:
            raise UserError(f"model {model_name} has no layer any attribution method supports")
        return methods
    for m in methods:
        reason = attribution.unsupported_reason(model, m)
        if reason:
            raise UserError(f"--method {m} cannot explain {model_name}: {reason}")
    return list(methods)
