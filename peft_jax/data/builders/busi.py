"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al. 2020)."""
from __future__ import annotations

import collections

from peft_jax.data.builders import common


class Busi(common.MedicalImageBuilder):
    """Breast ultrasound images of 600 women, benign / malignant / normal (780 images, ~500x500).

    Source: https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI_with_GT.zip).
    License: none stated by the authors (redistributions list CC0 1.0); cite the paper below.
    Layout (the manual directory, or its `Dataset_BUSI_with_GT/` sub-folder):
      benign/benign (1).png, benign/benign (1)_mask.png, ...
      malignant/malignant (1).png, ...
      normal/normal (1).png, ...
    `*_mask*.png` files are segmentation masks and are not examples. The release defines no
    splits and no patient ids: train / validation / test are 70 / 10 / 20 %, stratified by
    class with a fixed seed (each image its own group). BUSI has near-duplicate images
    (Pawlowska et al., Data in Brief 2023), which this split does not remove.
    """

    CLASS_NAMES = ("benign", "malignant", "normal")
    CHANNELS = 1
    HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
    LICENSE = "not stated by the authors (redistributions list CC0 1.0)"
    CITATION = ("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
                "Data in Brief 28 (2020) 104863.")
    LAYOUT = ("  {benign,malignant,normal}/<class> (<n>).png, directly in the manual directory or in its "
              "Dataset_BUSI_with_GT/ sub-folder (the unzipped release; the *_mask*.png files may stay)")

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "benign", alternatives=["Dataset_BUSI_with_GT"])
        files, labels = [], []
        for label, name in enumerate(self.CLASS_NAMES):
            folder = root / name
            if not folder.is_dir():
                raise FileNotFoundError(f"busi: the class folder {folder} is missing. {self.manual_instructions()}")
            images = [p for p in common.listdir_images(folder, [".png"]) if "_mask" not in p.name]
            if not images:
                raise FileNotFoundError(f"busi: no images in {folder}. {self.manual_instructions()}")
            files += [(root, p) for p in images]
            labels += [label] * len(images)
        ids = [str(p.relative_to(r)) for r, p in files]
        assignment = common.grouped_stratified_split(labels, ids, {"train": 0.7, "validation": 0.1, "test": 0.2})
        return {split: self._generate_examples([(f, lab) for (_, f), lab, a in zip(files, labels, assignment)
                                                if a == split], root, split)
                for split in ("train", "validation", "test")}

    def _generate_examples(self, examples, root, split):
        skipped = collections.Counter()
        for path, label in examples:
            image = self._image_bytes(path, skipped)
            if image is not None:
                key = str(path.relative_to(root))
                yield key, {"image": image, "label": label, "id": key, "group": key}
        self._warn_skipped(split, skipped)
