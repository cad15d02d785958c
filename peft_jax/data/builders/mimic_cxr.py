"""MIMIC-CXR-JPG chest X-rays with the findings and impression of their MIMIC-CXR reports (Johnson et al. 2019)."""
from __future__ import annotations

import collections
import csv
import gzip
import pathlib
import re

import tensorflow_datasets as tfds

from peft_jax.data.builders import common
from peft_jax.errors import UserError

SPLIT = "mimic-cxr-2.0.0-split.csv"
METADATA = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
FRONTAL = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
# Top-level headings of the MIMIC-CXR reports; any of them ends the section before it.
_HEADINGS = ("EXAMINATION", "EXAM", "INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY",
             "CLINICAL INFORMATION", "REASON FOR EXAM", "REASON FOR EXAMINATION", "TECHNIQUE", "PROCEDURE",
             "COMPARISON", "COMPARISONS", "FINDINGS", "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS",
             "RECOMMENDATION", "RECOMMENDATIONS", "RECOMMENDATION(S)", "NOTIFICATION", "ADDENDUM", "WET READ",
             "NOTE")
_HEADING = re.compile(r"^[ \t]*(?:(FINAL (?:REPORT|ADDENDUM))[ \t]*$|(" +
                      "|".join(re.escape(h) for h in sorted(_HEADINGS, key=len, reverse=True)) + r")[ \t]*:)",
                      re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """The FINDINGS and IMPRESSION sections of a free-text report, whitespace collapsed ("" if absent).

    A section runs from its heading to the next known top-level heading; a section that
    appears twice (a report with an addendum) is joined.
    """
    matches = list(_HEADING.finditer(text))
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    for match, following in zip(matches, matches[1:] + [None]):
        heading = (match.group(1) or match.group(2)).lower()
        key = {"impressions": "impression"}.get(heading, heading)
        if key in sections:
            body = text[match.end():following.start() if following else len(text)]
            sections[key].append(" ".join(body.split()))
    return {key: " ".join(part for part in parts if part) for key, parts in sections.items()}


def _open_csv(root: pathlib.Path, name: str):
    """The release's CSV as PhysioNet ships it (`.csv.gz`) or unpacked (`.csv`)."""
    if (root / name).is_file():
        return open(root / name, newline="")
    if (root / f"{name}.gz").is_file():
        return gzip.open(root / f"{name}.gz", "rt", newline="")
    raise FileNotFoundError(f"mimic_cxr: neither {root / name} nor {root / name}.gz exists. "
                            f"{MimicCxr.manual_instructions()}")


def _read_rows(root: pathlib.Path, name: str, columns: set[str]) -> list[dict[str, str]]:
    with _open_csv(root, name) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not columns <= set(reader.fieldnames):
            raise UserError(f"mimic_cxr: {root / name}(.gz) lacks the columns {sorted(columns)}; is it the "
                             f"release's {name}?")
        return list(reader)


def study_folder(subject_id: str, study_id: str) -> pathlib.Path:
    """`files/p10/p10000032/s50414267`: where a study's images (and, beside it, its report) live."""
    return pathlib.Path("files") / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


class MimicCxr(common.MedicalImageBuilder):
    """377,110 chest X-rays (JPEG) of 227,835 studies of 65,379 patients (Beth Israel Deaconess, 2011-2016).

    Source: https://physionet.org/content/mimic-cxr-jpg/2.0.0/ (images, CSVs) and
    https://physionet.org/content/mimic-cxr/2.0.0/ (`mimic-cxr-reports.zip`: the report texts).
    Both need a credentialed PhysioNet account and the data use agreement.
    License: PhysioNet Credentialed Health Data License 1.5.0.
    Layout (the manual directory; unzipping the reports into it merges the two `files/` trees):
      mimic-cxr-2.0.0-split.csv(.gz)      dicom_id,study_id,subject_id,split
      mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id,subject_id,study_id,...,ViewPosition,...
      mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id,study_id,Atelectasis,...,No Finding,...
      files/p10/p10000032/s50414267/<dicom_id>.jpg
      files/p10/p10000032/s50414267.txt   (the study's report)
    Splits: the official ones (train / validate / test, made by patient). Configs: `frontal`
    (default: PA and AP views, the text-to-image setting) and `all` (every view). Label: `normal`
    when CheXpert's `No Finding` is 1.0, else `abnormal`; a study without a CheXpert row, a
    missing image or a missing report is an error (or skipped with dataset.skip_bad_files).
    The FINDINGS and IMPRESSION sections of the report are stored with each image ("" when the
    report has no such section); `view` (PA, AP, LATERAL, ...) is kept as a subgroup.
    """

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="frontal", description="PA and AP views"),
        tfds.core.BuilderConfig(name="all", description="every view"),
    ]
    CLASS_NAMES = ("normal", "abnormal")
    CHANNELS = 1
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
    LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
    CITATION = ("Johnson AEW, Pollard TJ, Berkowitz SJ, et al. MIMIC-CXR, a de-identified publicly available "
                "database of chest radiographs with free-text reports. Sci. Data 6, 317 (2019). "
                "Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly available database "
                "of labeled chest radiographs. arXiv:1901.07042 (2019).")
    LAYOUT = (f"  {SPLIT}(.gz)\n  {METADATA}(.gz)\n  {CHEXPERT}(.gz)\n"
              "  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg   (MIMIC-CXR-JPG 2.0.0)\n"
              "  files/pXX/pXXXXXXXX/sXXXXXXXX.txt              (mimic-cxr-reports.zip of MIMIC-CXR 2.0.0, "
              "https://physionet.org/content/mimic-cxr/2.0.0/)")
    SUBGROUPS = {"view": tfds.features.Text()}
    EXTRA_FEATURES = {"findings": tfds.features.Text(), "impression": tfds.features.Text()}

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager, "files")
        splits = _read_rows(root, SPLIT, {"dicom_id", "study_id", "subject_id", "split"})
        views = {r["dicom_id"]: r["ViewPosition"] for r in _read_rows(root, METADATA, {"dicom_id", "ViewPosition"})}
        chexpert = {r["study_id"]: r for r in _read_rows(root, CHEXPERT, {"subject_id", "study_id", "No Finding"})}
        rows: dict[str, list[tuple[dict, str]]] = {name: [] for name in _SPLITS.values()}
        for line, row in enumerate(splits, start=2):
            if row["split"] not in _SPLITS:
                raise UserError(f"mimic_cxr: line {line} of {SPLIT} has split {row['split']!r}, not one of "
                                 f"{sorted(_SPLITS)}.")
            if row["dicom_id"] not in views:
                raise UserError(f"mimic_cxr: image {row['dicom_id']} (line {line} of {SPLIT}) is not in {METADATA}; "
                                 f"use the CSVs of one release.")
            view = views[row["dicom_id"]] or "unknown"
            if self.builder_config.name == "all" or view in FRONTAL:
                rows[_SPLITS[row["split"]]].append((row, view))
        return {split: self._generate_examples(rows[split], root, chexpert, split) for split in rows}

    def _generate_examples(self, rows, root: pathlib.Path, chexpert: dict[str, dict], split: str):
        skipped = collections.Counter()
        for row, view in rows:
            folder = root / study_folder(row["subject_id"], row["study_id"])
            report = folder.with_suffix(".txt")
            labels = chexpert.get(row["study_id"])
            if labels is None:
                self._bad(f"no CheXpert labels: study {row['study_id']} of image {row['dicom_id']} is not in "
                          f"{CHEXPERT}", skipped)
                continue
            if not report.is_file():
                self._bad(f"missing report: {report} (from mimic-cxr-reports.zip)", skipped)
                continue
            image = self._image_bytes(folder / f"{row['dicom_id']}.jpg", skipped)
            if image is None:
                continue
            sections = report_sections(report.read_text(errors="replace"))
            label = 0 if labels["No Finding"].strip() in ("1", "1.0") else 1
            yield row["dicom_id"], {"image": image, "label": label, "id": row["dicom_id"], "group": row["subject_id"],
                                    "view": view, **sections}
        self._warn_skipped(split, skipped)
