"""Pediatric chest X-rays, normal vs pneumonia (Kermany et al., Cell 2018)."""
from __future__ import annotations

import collections
import pathlib
import re

import tensorflow_datasets as tfds

from peft_jax.data.builders import common

_PATIENT = re.compile(r"^(person\d+|(?:NORMAL2-)?IM-\d+)")


def patient_id(filename: str) -> str:
    """`person1019_virus_1708.jpeg` -> `person1019`; `NORMAL2-IM-0381-0001.jpeg` -> `NORMAL2-IM-0381`."""
    match = _PATIENT.match(filename)
    return match.group(1) if match else filename


class ChestXrayPneumonia(common.MedicalImageBuilder):
    """Anterior-posterior chest X-rays of children aged 1-5 (Guangzhou), 5,856 images.

    Source: https://data.mendeley.com/datasets/rscbjbr9sj/2 (ChestXRay2017.zip) or the Kaggle
    copy "paultimothymooney/chest-xray-pneumonia". License: CC BY 4.0.
    Layout (the manual directory, or its `chest_xray/` sub-folder):
      train/NORMAL/IM-0115-0001.jpeg, train/PNEUMONIA/person1_bacteria_1.jpeg, ...
      test/NORMAL/..., test/PNEUMONIA/...
      val/NORMAL/..., val/PNEUMONIA/...        (Kaggle copy only; 16 images)
    Splits: `test` is the official test split; the official train (+ val when present) is
    split 90 / 10 into train / validation, stratified by label and grouped by patient
    (`personN` or `IM-NNNN` in the file name), so no child is on both sides. A folder without
    `test/` (a train-only copy) gets its test split carved from train instead: 80 / 10 / 10 into
    train / validation / test, grouped the same way; the builder says so when it prepares.
    Configs: `binary` (normal, pneumonia) and `three_class` (normal, bacterial, viral: from the
    `_bacteria_` / `_virus_` in the file name).
    """

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="binary", description="normal vs pneumonia"),
        tfds.core.BuilderConfig(name="three_class", description="normal vs bacterial vs viral pneumonia"),
    ]
    CHANNELS = 1
    HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
    LICENSE = "CC BY 4.0"
    CITATION = ("Kermany DS, Goldbaum M, et al. Identifying Medical Diagnoses and Treatable Diseases by "
                "Image-Based Deep Learning. Cell 172(5) (2018) 1122-1131.")
    LAYOUT = "  chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg (and optionally chest_xray/val/...)"

    def class_names(self) -> list[str]:
        if self.builder_config.name == "three_class":
            return ["normal", "bacterial", "viral"]
        return ["normal", "pneumonia"]

    def _label(self, path: pathlib.Path) -> int:
        if path.parent.name == "NORMAL":
            return 0
        if self.builder_config.name == "binary":
            return 1
        if "_bacteria_" in path.name:
            return 1
        if "_virus_" in path.name:
            return 2
        raise common.BadFileError(f"chest_xray_pneumonia: {path} is in PNEUMONIA but its name says neither "
                                  f"_bacteria_ nor _virus_, so the three_class label is unknown.")

    def _files(self, root: pathlib.Path, split: str) -> list[pathlib.Path]:
        files = []
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = root / split / cls
            if not folder.is_dir():
                raise FileNotFoundError(f"chest_xray_pneumonia: {folder} is missing. {self.manual_instructions()}")
            files += common.listdir_images(folder, [".jpeg", ".jpg", ".png"])
        return files

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "train", alternatives=["chest_xray"])
        development = self._files(root, "train") + (self._files(root, "val") if (root / "val").is_dir() else [])
        official_test = (root / "test").is_dir()
        fractions = {"train": 0.9, "validation": 0.1} if official_test else {"train": 0.8, "validation": 0.1,
                                                                             "test": 0.1}
        if not official_test:
            print(f"chest_xray_pneumonia: {root} has no test/ folder; the test split is carved from train "
                  "(10%, grouped by patient), not the official test split", flush=True)
        labels = [self._label(p) for p in development]
        assignment = common.grouped_stratified_split(labels, [patient_id(p.name) for p in development], fractions)
        splits = {name: [p for p, a in zip(development, assignment) if a == name] for name in fractions}
        if official_test:
            splits["test"] = self._files(root, "test")
        return {name: self._generate_examples(paths, root, name) for name, paths in splits.items()}

    def _generate_examples(self, paths, root, split):
        skipped = collections.Counter()
        for path in paths:
            image = self._image_bytes(path, skipped)
            if image is not None:
                key = str(path.relative_to(root))
                yield key, {"image": image, "label": self._label(path), "id": key, "group": patient_id(path.name)}
        self._warn_skipped(split, skipped)
