"""RSNA Pneumonia Detection Challenge (2018): adult chest X-rays as DICOM, lung opacity labels."""
from __future__ import annotations

import collections
import csv
import io
import math
import pathlib
import re

import numpy as np
import pydicom
import tensorflow_datasets as tfds
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from peft_jax.data.builders import common
from peft_jax.errors import UserError

LABELS = "stage_2_train_labels.csv"
CLASS_INFO = "stage_2_detailed_class_info.csv"
IMAGES = "stage_2_train_images"
# The three values of `class` in stage_2_detailed_class_info.csv, in label order.
DETAILED = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


def dicom_pixels(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    """A DICOM file's image as uint8 (H, W) for display, and its PatientSex / PatientAge / ViewPosition.

    The modality / VOI LUT (window) is applied when the file has one, MONOCHROME1 (white is
    zero) is inverted, and values are stretched to 0..255 unless they already are uint8.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array
    if pixels.ndim != 2:
        raise UserError(f"expected one grey-scale frame, got pixel data of shape {pixels.shape}")
    if pixels.dtype != np.uint8 or "WindowCenter" in ds or "VOILUTSequence" in ds:
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = np.round((pixels - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = 255 - pixels
    tags = {key: str(ds.get(key, "") or "") for key in ("PatientSex", "PatientAge", "ViewPosition")}
    return pixels, tags


def dicom_age(value: str) -> float:
    """DICOM age strings in years: "051Y" -> 51, "006M" -> 0.5; RSNA's plain "51" -> 51; NaN if absent."""
    match = re.fullmatch(r"\s*(\d+)\s*([DWMY]?)\s*", value or "")
    if not match:
        return math.nan
    per_year = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.0}[match.group(2)]
    return int(match.group(1)) / per_year


class RsnaPneumonia(common.MedicalImageBuilder):
    """26,684 frontal chest X-rays (1024x1024 DICOM, from NIH ChestX-ray14) labelled for lung opacity.

    Source: https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data
    (also https://www.rsna.org/rsnai/ai-image-challenge/rsna-pneumonia-detection-challenge-2018).
    License: the competition's terms (non-commercial research use); cite the paper below.
    Layout (the manual directory, or its `rsna-pneumonia-detection-challenge/` sub-folder):
      stage_2_train_labels.csv            patientId,x,y,width,height,Target (one row per box)
      stage_2_detailed_class_info.csv     patientId,class (one row per box)
      stage_2_train_images/<patientId>.dcm
    Configs: `binary` (Target: no_opacity / lung_opacity, the challenge's pneumonia label) and
    `three_class` (the detailed class: normal, no_opacity_not_normal, lung_opacity). The boxes are
    not used. The labelled stage-2 test images were never released, so there is no official
    split: train / validation / test are 70 / 10 / 20 %, stratified by the three-class label and
    grouped by `patientId` (both configs share the split). The release has one image per
    `patientId` and does not say which ChestX-ray14 patient an image comes from, so the grouping
    cannot go further than that. Subgroups from the DICOM header: sex, age_group, view (PA / AP).
    """

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="binary", description="Target: lung opacity or not"),
        tfds.core.BuilderConfig(name="three_class", description="normal / no lung opacity but not normal / lung "
                                                                "opacity"),
    ]
    CHANNELS = 1
    HOMEPAGE = "https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data"
    LICENSE = "RSNA Pneumonia Detection Challenge terms of use (non-commercial research)"
    CITATION = ("Shih G, Wu CC, Halabi SS, et al. Augmenting the National Institutes of Health Chest Radiograph "
                "Dataset with Expert Annotations of Possible Pneumonia. Radiology: Artificial Intelligence 1(1) "
                "(2019) e180041.")
    LAYOUT = f"  {LABELS}\n  {CLASS_INFO}\n  {IMAGES}/<patientId>.dcm"
    SUBGROUPS = {"sex": tfds.features.Text(), "age": np.float32, "view": tfds.features.Text()}

    def class_names(self) -> list[str]:
        if self.builder_config.name == "three_class":
            return ["normal", "no_opacity_not_normal", "lung_opacity"]
        return ["no_opacity", "lung_opacity"]

    def _read_labels(self, root: pathlib.Path) -> dict[str, int]:
        """patientId -> index in DETAILED, checked against Target (the two CSVs must agree)."""
        for name in (LABELS, CLASS_INFO):
            if not (root / name).is_file():
                raise FileNotFoundError(f"rsna_pneumonia: {root / name} is missing. {self.manual_instructions()}")
        targets = _column_by_patient(root / LABELS, "Target", {"0", "1"})
        detailed = _column_by_patient(root / CLASS_INFO, "class", set(DETAILED))
        if set(targets) != set(detailed):
            only = sorted(set(targets) ^ set(detailed))
            raise UserError(f"rsna_pneumonia: {LABELS} and {CLASS_INFO} list different patients "
                             f"({len(only)} in one only, e.g. {only[0]}); use the two files of one release.")
        for patient, target in targets.items():
            if (target == "1") != (detailed[patient] == "Lung Opacity"):
                raise UserError(f"rsna_pneumonia: patient {patient} has Target {target} in {LABELS} but class "
                                 f"{detailed[patient]!r} in {CLASS_INFO}; the files are inconsistent.")
        return {patient: DETAILED.index(cls) for patient, cls in detailed.items()}

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, LABELS, alternatives=["rsna-pneumonia-detection-challenge"])
        if not (root / IMAGES).is_dir():
            raise FileNotFoundError(f"rsna_pneumonia: the image folder {root / IMAGES} is missing. "
                                    f"{self.manual_instructions()}")
        detailed = self._read_labels(root)
        patients = sorted(detailed)
        assignment = common.grouped_stratified_split([detailed[p] for p in patients], patients,
                                                     {"train": 0.7, "validation": 0.1, "test": 0.2})
        return {split: self._generate_examples([(p, detailed[p]) for p, a in zip(patients, assignment) if a == split],
                                               root / IMAGES, split)
                for split in ("train", "validation", "test")}

    def _label(self, detailed: int) -> int:
        return detailed if self.builder_config.name == "three_class" else int(DETAILED[detailed] == "Lung Opacity")

    def _generate_examples(self, patients, folder: pathlib.Path, split: str):
        skipped = collections.Counter()
        for patient, detailed in patients:
            path = folder / f"{patient}.dcm"
            if not path.is_file():
                self._bad(f"missing image: {path}", skipped)
                continue
            try:
                pixels, tags = dicom_pixels(path.read_bytes())
                image = common.array_to_png(pixels, self.max_side)
            except (OSError, ValueError, AttributeError, RuntimeError, pydicom.errors.InvalidDicomError) as e:
                self._bad(f"unreadable image: {path} ({e})", skipped)
                continue
            yield patient, {"image": image, "label": self._label(detailed), "id": patient, "group": patient,
                            "sex": {"M": "male", "F": "female"}.get(tags["PatientSex"], "unknown"),
                            "age": dicom_age(tags["PatientAge"]), "view": tags["ViewPosition"] or "unknown"}
        self._warn_skipped(split, skipped)


def _column_by_patient(path: pathlib.Path, column: str, allowed: set[str]) -> dict[str, str]:
    """One value of `column` per patientId; the CSVs repeat a patient once per box, always alike."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"patientId", column} <= set(reader.fieldnames):
            raise UserError(f"rsna_pneumonia: {path} lacks the columns patientId and {column}; is it the "
                             f"release's {path.name}?")
        values: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            value = row[column]
            if value not in allowed:
                raise UserError(f"rsna_pneumonia: line {line} of {path} has {column}={value!r}, not one of "
                                 f"{sorted(allowed)}.")
            if values.setdefault(row["patientId"], value) != value:
                raise UserError(f"rsna_pneumonia: patient {row['patientId']} has two different {column} values "
                                 f"in {path} (line {line}).")
    return values
