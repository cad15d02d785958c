"""Indiana University chest X-rays with radiology reports (Open-i; Demner-Fushman et al. 2016)."""
from __future__ import annotations

import collections
import csv
import pathlib

import tensorflow_datasets as tfds

from peft_jax.data.builders import common
from peft_jax.errors import UserError

IMAGE_FOLDERS = ("images/images_normalized", "images_normalized", "images")


class IuXray(common.MedicalImageBuilder):
    """3,851 chest X-ray reports with 7,466 frontal / lateral images: the open substitute for MIMIC-CXR.

    Source: https://openi.nlm.nih.gov/faq (NLM Open-i, Indiana University collection); the
    Kaggle copy "raddar/chest-xrays-indiana-university" has the layout below.
    License: CC BY-NC-ND 4.0 (Open-i). Reports are de-identified ("XXXX").
    Layout (the manual directory):
      indiana_reports.csv       uid,MeSH,Problems,image,indication,comparison,findings,impression
      indiana_projections.csv   uid,filename,projection
      images/images_normalized/<filename>   (e.g. 1_IM-0001-4001.dcm.png; `images/` also works)
    Only frontal views are used (the text-to-image setting). Label: `normal` when the report's
    MeSH is "normal", else `abnormal`. The findings and impression texts are stored with each
    image. No official split: train / validation / test are 70 / 10 / 20 %, stratified by label
    and grouped by report `uid`.
    """

    CLASS_NAMES = ("normal", "abnormal")
    CHANNELS = 1
    HOMEPAGE = "https://openi.nlm.nih.gov/faq"
    LICENSE = "CC BY-NC-ND 4.0"
    CITATION = ("Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of radiology examinations "
                "for distribution and retrieval. J Am Med Inform Assoc 23(2) (2016) 304-310.")
    LAYOUT = "  indiana_reports.csv\n  indiana_projections.csv\n  images/images_normalized/<filename>.png"
    EXTRA_FEATURES = {"findings": tfds.features.Text(), "impression": tfds.features.Text()}

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "indiana_reports.csv")
        if not (root / "indiana_projections.csv").is_file():
            raise FileNotFoundError(
                f"iu_xray: {root / 'indiana_projections.csv'} is missing. {self.manual_instructions()}")
        with open(root / "indiana_reports.csv", newline="") as f:
            reports = {r["uid"]: r for r in csv.DictReader(f)}
        with open(root / "indiana_projections.csv", newline="") as f:
            frontal = [r for r in csv.DictReader(f) if r["projection"] == "Frontal"]
        orphans = [r["filename"] for r in frontal if r["uid"] not in reports]
        if orphans:
            raise UserError(
                f"iu_xray: {len(orphans)} projections have no report in indiana_reports.csv, e.g. {orphans[0]}.")
        folder = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"iu_xray: no image folder ({', '.join(IMAGE_FOLDERS)}) in {root}. "
                                    f"{self.manual_instructions()}")
        labels = [int(reports[r["uid"]]["MeSH"].strip().lower() != "normal") for r in frontal]
        assignment = common.grouped_stratified_split(labels, [r["uid"] for r in frontal],
                                                     {"train": 0.7, "validation": 0.1, "test": 0.2})
        rows = {split: [(r, reports[r["uid"]], lab) for r, lab, a in zip(frontal, labels, assignment) if a == split]
                for split in ("train", "validation", "test")}
        return {split: self._generate_examples(rows[split], folder, split) for split in rows}

    def _generate_examples(self, rows, folder: pathlib.Path, split: str):
        skipped = collections.Counter()
        for projection, report, label in rows:
            image = self._image_bytes(folder / projection["filename"], skipped)
            if image is None:
                continue
            yield projection["filename"], {"image": image, "label": label, "id": projection["filename"],
                                           "group": projection["uid"], "findings": report["findings"],
                                           "impression": report["impression"]}
        self._warn_skipped(split, skipped)
