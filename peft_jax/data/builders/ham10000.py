"""HAM10000: dermoscopic images of pigmented skin lesions (Tschandl et al. 2018)."""
from __future__ import annotations

import collections
import csv
import math

import numpy as np
import tensorflow_datasets as tfds

from peft_jax.data.builders import common
from peft_jax.errors import UserError

IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "images")


class Ham10000(common.MedicalImageBuilder):
    """10,015 dermoscopic images (600x450) of 7,470 lesions in 7 diagnostic classes.

    Source: https://doi.org/10.7910/DVN/DBW86T (Harvard Dataverse). License: CC BY-NC 4.0.
    Layout (the manual directory):
      HAM10000_metadata.csv          lesion_id,image_id,dx,dx_type,age,sex,localization
      HAM10000_images_part_1/ISIC_0024306.jpg, ...
      HAM10000_images_part_2/ISIC_0029306.jpg, ...   (a single `images/` folder also works)
    Classes are the `dx` codes: akiec, bcc, bkl, df, mel, nv, vasc. The release has no labelled
    test split: train / validation / test are 70 / 10 / 20 %, stratified by class and grouped by
    `lesion_id`, so no lesion (photographed up to 6 times) is on two sides. Sex, age and
    localisation are kept as subgroups (age NaN when unknown).
    """

    CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    CHANNELS = 3
    HOMEPAGE = "https://doi.org/10.7910/DVN/DBW86T"
    LICENSE = "CC BY-NC 4.0"
    CITATION = ("Tschandl P, Rosendahl C, Kittler H. The HAM10000 dataset, a large collection of multi-source "
                "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).")
    LAYOUT = ("  HAM10000_metadata.csv\n  HAM10000_images_part_1/ISIC_*.jpg\n  HAM10000_images_part_2/ISIC_*.jpg")
    SUBGROUPS = {"sex": tfds.features.Text(), "age": np.float32, "localization": tfds.features.Text()}
    # The lesion segmentations (Tschandl et al. 2020), one per image, same frame as the image.
    MASKS = ("masks/{id}_segmentation.png", "HAM10000_segmentations_lesion_tschandl/{id}_segmentation.png")

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "HAM10000_metadata.csv")
        with open(root / "HAM10000_metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        required = {"lesion_id", "image_id", "dx", "age", "sex", "localization"}
        if not rows or not required <= set(rows[0]):
            raise UserError(f"ham10000: {root / 'HAM10000_metadata.csv'} lacks the columns {sorted(required)}.")
        for i, row in enumerate(rows):
            if row["dx"] not in self.CLASS_NAMES:
                raise UserError(f"ham10000: row {i + 2} of HAM10000_metadata.csv has dx {row['dx']!r}, "
                                 f"not one of {self.CLASS_NAMES}.")
        folders = [root / name for name in IMAGE_FOLDERS if (root / name).is_dir()]
        if not folders:
            raise FileNotFoundError(f"ham10000: no image folder ({', '.join(IMAGE_FOLDERS)}) in {root}. "
                                    f"{self.manual_instructions()}")
        labels = [self.CLASS_NAMES.index(r["dx"]) for r in rows]
        assignment = common.grouped_stratified_split(labels, [r["lesion_id"] for r in rows],
                                                     {"train": 0.7, "validation": 0.1, "test": 0.2})
        return {split: self._generate_examples([r for r, a in zip(rows, assignment) if a == split], folders, split)
                for split in ("train", "validation", "test")}

    def _generate_examples(self, rows, folders, split):
        skipped = collections.Counter()
        for row in rows:
            name = f"{row['image_id']}.jpg"
            path = next((f / name for f in folders if (f / name).is_file()), folders[0] / name)
            image = self._image_bytes(path, skipped)
            if image is None:
                continue
            age = float(row["age"]) if row["age"] else math.nan
            yield row["image_id"], {"image": image, "label": self.CLASS_NAMES.index(row["dx"]), "id": row["image_id"],
                                    "group": row["lesion_id"], "sex": row["sex"], "age": age,
                                    "localization": row["localization"]}
        self._warn_skipped(split, skipped)
