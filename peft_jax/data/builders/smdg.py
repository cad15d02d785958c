"""SMDG-19: Standardized Multi-Channel Dataset for Glaucoma, full fundus images (Kiefer et al.)."""
from __future__ import annotations

import collections
import csv
import math
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from peft_jax.data.builders import common
from peft_jax.errors import UserError

METADATA = "metadata - standardized.csv"


def source_dataset(name: str) -> str:
    """`OIA-ODIR-TEST-OFFLINE-1` -> `OIA-ODIR-TEST-OFFLINE`: the public dataset an image comes from."""
    return name.rsplit("-", 1)[0]


class Smdg(common.MedicalImageBuilder):
    """Fundus photographs from 19 public glaucoma datasets, harmonised, glaucoma vs non-glaucoma.

    Source: https://www.kaggle.com/datasets/deathtrooper/multichannel-glaucoma-benchmark-dataset
    (metadata also at https://github.com/TheBeastCoding/standardized-multichannel-dataset-glaucoma).
    License: none stated for the collection; each source dataset keeps its own license. Cite below.
    Layout (the manual directory):
      metadata - standardized.csv     names,types,...,patient_id,fundus,...,sex,...,age,eye,...
      full-fundus/<names>.png         (the `fundus` column holds `/full-fundus/<names>.png`)
    Labels from `types`: 0 non_glaucoma, 1 glaucoma; the glaucoma suspects (`types` = -1) are
    not used. Rows without a `fundus` image are an error (or skipped with dataset.skip_bad_files).
    No official split: train / validation / test are 70 / 10 / 20 %, stratified by label and
    grouped by `patient_id` where the source dataset gives one (both eyes of a patient stay
    together), else by image. Subgroups: sex, age_group, and the source dataset.
    """

    CLASS_NAMES = ("non_glaucoma", "glaucoma")
    CHANNELS = 3
    HOMEPAGE = "https://www.kaggle.com/datasets/deathtrooper/multichannel-glaucoma-benchmark-dataset"
    LICENSE = "per source dataset (none stated for the collection)"
    CITATION = ("Kiefer R, Abid M, Steen J, Ardali MR, Amjadian E. A Catalog of Public Glaucoma Datasets for "
                "Machine Learning Applications. ICIIT 2023.")
    LAYOUT = f"  {METADATA}\n  full-fundus/<names>.png"
    SUBGROUPS = {"sex": tfds.features.Text(), "age": np.float32, "source": tfds.features.Text()}

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, METADATA)
        with open(root / METADATA, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("types") in ("0", "1")]
        if not rows or not {"names", "types", "patient_id", "fundus", "sex", "age"} <= set(rows[0]):
            raise UserError(f"smdg: {root / METADATA} has no labelled rows with the columns names, types, "
                             f"patient_id, fundus, sex, age. {self.manual_instructions()}")
        labels = [int(r["types"]) for r in rows]
        groups = [r["patient_id"] or r["names"] for r in rows]
        assignment = common.grouped_stratified_split(labels, groups, {"train": 0.7, "validation": 0.1, "test": 0.2})
        return {split: self._generate_examples([(r, g) for r, g, a in zip(rows, groups, assignment) if a == split],
                                               root, split)
                for split in ("train", "validation", "test")}

    def _generate_examples(self, rows, root: pathlib.Path, split: str):
        skipped = collections.Counter()
        for row, group in rows:
            if not row["fundus"]:
                self._bad(f"missing image: row {row['names']} has no fundus path", skipped)
                continue
            image = self._image_bytes(root / row["fundus"].lstrip("/"), skipped)
            if image is None:
                continue
            age = float(row["age"]) if row["age"] else math.nan
            yield row["names"], {"image": image, "label": int(row["types"]), "id": row["names"], "group": group,
                                 "sex": {"M": "male", "F": "female"}.get(row["sex"], "unknown"), "age": age,
                                 "source": source_dataset(row["names"])}
        self._warn_skipped(split, skipped)
