"""Builders for releases that ../shared/data cannot hold (RSNA DICOMs, MIMIC-CXR-JPG), on generated trees.

The files are small but valid instances of the release formats: real DICOM files written with
pydicom (uncompressed and JPEG baseline, as in the RSNA release) and a MIMIC-CXR-JPG tree with
its four CSVs and free-text reports.
"""
import csv
import gzip
import io
import pathlib
import warnings

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from peft_jax import data
from peft_jax.data import tfds_loader
from peft_jax.data.builders import common, rsna_pneumonia


def _cfg(name: str, manual_dir, data_dir, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(name=name, data_dir=str(data_dir), manual_dir=str(manual_dir), fraction=1.0, download=False,
               skip_bad_files=False, config=None)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _records(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [{k: _text(v) if k != "image" else v for k, v in r.items()} for r in source]


def _all_labels(ds, num_classes: int) -> tuple[int, ...]:
    return tuple(int(n) for n in sum(np.bincount(s.labels, minlength=num_classes)
                                     for s in (ds.train, ds.validation, ds.test)))


# --- RSNA Pneumonia Detection Challenge -------------------------------------------------------------------------


def _write_dicom(path: pathlib.Path, pixels: np.ndarray, *, patient: str, sex: str, age: str, view: str,
                 jpeg: bool = False, photometric: str = "MONOCHROME2", bits: int = 8) -> None:
    """A minimal valid DICOM file, uncompressed or JPEG baseline (as most RSNA files are)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = patient
    ds.PatientSex = sex
    with warnings.catch_warnings():  # RSNA's ages are plain numbers ("51"), not DICOM's "051Y" form.
        warnings.simplefilter("ignore")
        ds.PatientAge = age
    ds.ViewPosition = view
    if jpeg:
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=95)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([encoded.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(pixels, photometric, bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _pixels(seed: int, shape=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def rsna_manual(tmp_path):
    """30 patients, 10 per detailed class; lung-opacity patients have two box rows, as in the release."""
    manual = tmp_path / "rsna"
    labels, info = [["patientId", "x", "y", "width", "height", "Target"]], [["patientId", "class"]]
    for i in range(30):
        patient = f"{i:08x}-14fd-4e49-80ba-63a80b6bddd6"
        cls = rsna_pneumonia.DETAILED[i % 3]
        boxes = [["264.0", "152.0", "213.0", "379.0"], ["562.0", "152.0", "256.0", "453.0"]] if i % 3 == 2 else [
            ["", "", "", ""]]
        for box in boxes:
            labels.append([patient, *box, "1" if i % 3 == 2 else "0"])
            info.append([patient, cls])
        _write_dicom(manual / "stage_2_train_images" / f"{patient}.dcm", _pixels(i), patient=patient,
                     sex="MF"[i % 2], age=str(20 + 2 * i) if i != 7 else "045Y", view=("PA", "AP")[i % 2],
                     jpeg=i % 4 == 1)
    for name, rows in (("stage_2_train_labels.csv", labels), ("stage_2_detailed_class_info.csv", info)):
        with open(manual / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return manual


def test_rsna_pneumonia_generated_dicoms(rsna_manual, tmp_path):
    ds = data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["no_opacity", "lung_opacity"]
    assert _all_labels(ds, 2) == (20, 10)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (21, 3, 6)  # 7 / 1 / 2 of every detailed class
    assert tuple(np.bincount(ds.test.labels)) == (4, 2)
    builder = tfds_loader.make_builder("rsna_pneumonia", data_dir=tmp_path / "tfds")
    records = {s: _records(builder, s) for s in ("train", "validation", "test")}
    groups = [{r["group"] for r in records[s]} for s in records]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert set(ds.train.subgroups) == {"sex", "age_group", "view"}
    by_id = {r["id"]: (split, i) for split in records for i, r in enumerate(records[split])}
    # Uncompressed DICOM pixels arrive unchanged; JPEG-baseline ones decode to within JPEG error.
    for i in (0, 1):
        split, index = by_id[f"{i:08x}-14fd-4e49-80ba-63a80b6bddd6"]
        image = getattr(ds, split).images[index]
        assert image.shape == (40, 48, 1) and image.dtype == np.uint8
        error = np.abs(image[..., 0].astype(int) - _pixels(i)).mean()
        assert error == 0 if i == 0 else error < 20
        subgroups = {k: str(v[index]) for k, v in getattr(ds, split).subgroups.items()}
        assert subgroups == {"sex": ("male", "female")[i % 2], "view": ("PA", "AP")[i % 2], "age_group": "20-39"}
    three = data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "tfds", config="three_class"), seed=0)
    assert three.class_names == ["normal", "no_opacity_not_normal", "lung_opacity"]
    assert _all_labels(three, 3) == (10, 10, 10)
    three_builder = tfds_loader.make_builder("rsna_pneumonia", data_dir=tmp_path / "tfds", config="three_class")
    assert [{r["id"] for r in _records(three_builder, s)} for s in records] == [
        {r["id"] for r in records[s]} for s in records]  # both configs share one split


def test_rsna_missing_or_corrupt_dicom_is_named_or_skipped(rsna_manual, tmp_path):
    images = sorted((rsna_manual / "stage_2_train_images").iterdir())
    images[3].unlink()
    images[4].write_bytes(images[4].read_bytes()[:-300])  # truncated pixel data
    with pytest.raises(common.BadFileError, match=rf"{images[3].name}|{images[4].name}"):
        data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "a"), seed=0)
    with pytest.warns(UserWarning, match="skipped"):
        ds = data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "b", skip_bad_files=True), seed=0)
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 28


def test_rsna_inconsistent_csvs_name_the_patient(rsna_manual, tmp_path):
    path = rsna_manual / "stage_2_detailed_class_info.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Normal", "Lung Opacity")  # patient 0 has Target 0
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="00000000-14fd.*Target 0"):
        data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "tfds"), seed=0)
    (rsna_manual / "stage_2_train_labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)stage_2_train_labels.csv.*kaggle.com/competitions/rsna"):
        data.load_dataset(_cfg("rsna_pneumonia", rsna_manual, tmp_path / "tfds2"), seed=0)


def test_dicom_pixels_monochrome1_and_12_bit(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4095]], np.uint16)
    _write_dicom(tmp_path / "x.dcm", pixels, patient="p", sex="F", age="006M", view="AP", photometric="MONOCHROME1",
                 bits=12)
    image, tags = rsna_pneumonia.dicom_pixels((tmp_path / "x.dcm").read_bytes())
    assert image.dtype == np.uint8 and image.tolist() == [[255, 193], [130, 0]]  # stretched, then inverted
    assert tags == {"PatientSex": "F", "PatientAge": "006M", "ViewPosition": "AP"}
    assert rsna_pneumonia.dicom_age("006M") == 0.5 and rsna_pneumonia.dicom_age("51") == 51.0
    assert np.isnan(rsna_pneumonia.dicom_age(""))


# --- MIMIC-CXR-JPG with MIMIC-CXR reports ----------------------------------------------------------------------


def _write_csv(path: pathlib.Path, rows: list[dict], compress: bool) -> None:
    """A release CSV, gzipped as PhysioNet ships it or unpacked."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if compress:
        with gzip.open(f"{path}.gz", "wt", newline="") as f:
            f.write(text.getvalue())
    else:
        path.write_text(text.getvalue())


@pytest.fixture
def mimic_manual(tmp_path):
    """12 patients in the official splits 8 / 2 / 2; 1 or 2 studies each with PA, AP and lateral images."""
    manual = tmp_path / "mimic"
    images, splits, metadata, chexpert = [], [], [], []
    for s in range(12):
        subject = f"1{s:07d}"
        split = "train" if s < 8 else "validate" if s < 10 else "test"
        for k in range(1 + s % 2):
            study = f"5{s:03d}{k:04d}"
            folder = manual / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            findings = f"The lungs are clear in study {study}. No effusion."
            impression = f"No acute process ({study})."
            wrapped = findings.replace(". ", ".\n ")  # reports wrap lines
            report = (f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
                      f" INDICATION:  ___F with cough\n \n FINDINGS: \n \n {wrapped}\n \n"
                      f" IMPRESSION: \n \n {impression}\n")
            if s == 3:  # some reports have an impression only
                report, findings = f" FINAL REPORT\n IMPRESSION:  {impression}\n", ""
            folder.mkdir(parents=True)
            folder.with_suffix(".txt").write_text(report)
            normal = (s + k) % 3 == 0
            chexpert.append({"subject_id": subject, "study_id": study, "Atelectasis": "" if normal else "1.0",
                             "No Finding": "1.0" if normal else "", "Pneumonia": "" if normal else "-1.0"})
            for j, view in enumerate(("PA", "LATERAL") if k == 0 else ("AP", "AP", "LL")):
                dicom = f"{s:08x}-{k:08x}-{j:08x}-7bc16630-4e384014"
                images.append(dict(dicom_id=dicom, subject=subject, split=split, view=view, normal=normal,
                                   findings=findings, impression=impression, path=folder / f"{dicom}.jpg"))
                splits.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
                metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                 "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                                 "Rows": "40", "Columns": "48"})
                Image.fromarray(_pixels(s * 10 + k * 3 + j)).save(folder / f"{dicom}.jpg", format="JPEG")
    _write_csv(manual / "mimic-cxr-2.0.0-split.csv", splits, compress=True)
    _write_csv(manual / "mimic-cxr-2.0.0-metadata.csv", metadata, compress=True)
    _write_csv(manual / "mimic-cxr-2.0.0-chexpert.csv", chexpert, compress=False)
    return manual, images


def test_mimic_cxr_official_splits_frontal_views_and_report_sections(mimic_manual, tmp_path):
    manual, images = mimic_manual
    ds = data.load_dataset(_cfg("mimic_cxr", manual, tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["normal", "abnormal"]
    frontal = [im for im in images if im["view"] in ("PA", "AP")]
    for name, split in (("train", ds.train), ("validate", ds.validation), ("test", ds.test)):
        mine = [im for im in frontal if im["split"] == name]
        assert len(split) == len(mine)
        assert tuple(np.bincount(split.labels, minlength=2)) == (sum(im["normal"] for im in mine),
                                                                   sum(not im["normal"] for im in mine))
        assert set(split.subgroups["view"]) <= {"PA", "AP"}
    builder = tfds_loader.make_builder("mimic_cxr", data_dir=tmp_path / "tfds")
    records = {s: _records(builder, s) for s in ("train", "validation", "test")}
    subjects = [{r["group"] for r in records[s]} for s in records]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    by_id = {im["dicom_id"]: im for im in images}
    for record in [r for s in records for r in records[s]]:  # the report text reaches every record
        expected = by_id[record["id"]]
        assert (record["findings"], record["impression"]) == (expected["findings"], expected["impression"])
    assert any(r["findings"] == "" for r in records["train"])  # s == 3: impression only
    assert ds.train.images[0].shape == (40, 48, 1)
    every = data.load_dataset(_cfg("mimic_cxr", manual, tmp_path / "tfds", config="all"), seed=0)
    assert len(every.train) + len(every.validation) + len(every.test) == len(images)


def test_mimic_cxr_missing_report_or_labels_are_named_or_skipped(mimic_manual, tmp_path):
    manual, images = mimic_manual
    report = images[0]["path"].parent.with_suffix(".txt")
    report.unlink()
    with pytest.raises(common.BadFileError, match=rf"missing report: .*{report.name}"):
        data.load_dataset(_cfg("mimic_cxr", manual, tmp_path / "a"), seed=0)
    with pytest.warns(UserWarning, match="skipped 1 bad files"):
        ds = data.load_dataset(_cfg("mimic_cxr", manual, tmp_path / "b", skip_bad_files=True), seed=0)
    assert len(ds.train) + len(ds.validation) + len(ds.test) == sum(im["view"] in ("PA", "AP") for im in images) - 1
    (manual / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)mimic-cxr-2.0.0-chexpert.csv.*physionet.org"):
        data.load_dataset(_cfg("mimic_cxr", manual, tmp_path / "c"), seed=0)


def test_report_sections_stop_at_the_next_heading():
    from peft_jax.data.builders.mimic_cxr import report_sections

    text = (" FINAL REPORT\n FINDINGS:  Heart size normal.\n Lungs clear.\n IMPRESSION:\n No acute process.\n"
            " RECOMMENDATION(S):  Follow-up.\n FINAL ADDENDUM\n IMPRESSION:  Nodule unchanged.\n")
    assert report_sections(text) == {"findings": "Heart size normal. Lungs clear.",
                                     "impression": "No acute process. Nodule unchanged."}
    assert report_sections("no headings") == {"findings": "", "impression": ""}


def test_mimic_cxr_report_prompts_for_text_to_image(mimic_manual, sd15_config, tmp_path):
    """The t2i prompts of MIMIC-CXR: the findings of the frontal training images ("" for the impression-only
    reports: left out in training); an unknown prompt field is refused before any preparation."""
    from peft_jax.t2i import data as t2i_data

    manual, images = mimic_manual
    cfg = sd15_config().dataset
    cfg.update(name="mimic_cxr", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"), prompt_field="findings")
    examples = t2i_data.load_examples(cfg, 16)
    prompts = [examples.read(i)[1] for i in range(examples.count)]
    expected = [im["findings"] for im in images if im["split"] == "train" and im["view"] in ("PA", "AP")]
    assert sorted(prompts) == sorted(expected) and "" in expected
    cfg.prompt_field = "report"
    with pytest.raises(ValueError, match="prompt_field"):
        t2i_data.load_examples(cfg, 16)
