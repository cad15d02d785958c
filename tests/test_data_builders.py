"""TFDS builders on the real images of ../shared/data, laid out as their releases are."""
import os
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from peft_jax import data
from peft_jax.data import tfds_loader
from peft_jax.data.builders import common
from peft_jax.data.builders.chest_xray_pneumonia import patient_id
from peft_jax.testing import csv_subset, iu_xray_subset, write_random_images


def _cfg(name: str, manual_dir, data_dir, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(name=name, data_dir=str(data_dir), manual_dir=str(manual_dir), fraction=1.0, download=False,
               skip_bad_files=False, config=None)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _groups(builder, split: str) -> set[str]:
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {r["group"].decode() if isinstance(r["group"], bytes) else r["group"] for r in source}


def _link_tree(src: pathlib.Path, dst: pathlib.Path, pattern: str = "*") -> None:
    """Symlinks every file of src matching pattern into dst (real images, no copies)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob(pattern)):
        os.symlink(f, dst / f.name)


def test_grouped_stratified_split_keeps_groups_whole():
    groups = [f"g{i // 3}" for i in range(600)]
    labels = [int(g[1:]) % 4 for g in groups]
    assignment = common.grouped_stratified_split(labels, groups, {"train": 0.7, "validation": 0.1, "test": 0.2})
    for g in set(groups):
        assert len({a for a, h in zip(assignment, groups) if h == g}) == 1
    for cls in range(4):
        mine = assignment[np.array(labels) == cls]
        assert abs(np.mean(mine == "train") - 0.7) < 0.05 and abs(np.mean(mine == "test") - 0.2) < 0.05
    again = common.grouped_stratified_split(labels, groups, {"train": 0.7, "validation": 0.1, "test": 0.2})
    assert np.array_equal(assignment, again)


def test_busi_real_images(shared_data, tmp_path):
    manual = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        _link_tree(shared_data / "busi" / cls, manual / cls)
    first = sorted((manual / "benign").iterdir())[0]
    os.symlink(first.resolve(), manual / "benign" / (first.stem + "_mask.png"))  # masks are not examples
    ds = data.load_dataset(_cfg("busi", tmp_path, tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["benign", "malignant", "normal"]
    assert [tuple(np.bincount(s.labels)) for s in (ds.train, ds.validation, ds.test)] == [(21,) * 3, (3,) * 3, (6,) * 3]
    image = ds.train.images[0]
    assert image.dtype == np.uint8 and image.shape == (256, 256, 1)
    builder = tfds_loader.make_builder("busi", data_dir=tmp_path / "tfds")
    splits = [_groups(builder, s) for s in ("train", "validation", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    batch = next(data.train_batches(ds.train, batch_size=4, image_size=32, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.int32
    small = data.load_dataset(_cfg("busi", tmp_path, tmp_path / "tfds", fraction=0.2), seed=1)  # reuses the build
    assert tuple(np.bincount(small.train.labels)) == (4, 4, 4) and small.train.images[0].shape == (256, 256, 1)


def test_busi_accepts_the_class_folders_directly_and_prints_one_honest_line(shared_data, tmp_path, capfd):
    manual = tmp_path / "flat"  # the release's contents without its Dataset_BUSI_with_GT/ folder
    for cls in ("benign", "malignant", "normal"):
        _link_tree(shared_data / "busi" / cls, manual / cls)
    ds = data.load_dataset(_cfg("busi", manual, tmp_path / "tfds"), seed=0)
    assert [tuple(np.bincount(s.labels)) for s in (ds.train, ds.validation, ds.test)] == [(21,) * 3, (3,) * 3, (6,) * 3]
    out = capfd.readouterr()
    builder = tfds_loader.make_builder("busi", data_dir=tmp_path / "tfds")
    assert f"[data] preparing busi from {manual} into {builder.data_dir}" in out.err
    assert "Downloading and preparing" not in out.out + out.err and "downloaded and prepared" not in out.out + out.err


def test_busi_corrupt_image_is_named_or_skipped_with_a_warning(shared_data, tmp_path):
    for cls in ("benign", "malignant", "normal"):
        _link_tree(shared_data / "busi" / cls, tmp_path / "m" / cls)
    (tmp_path / "m" / "normal" / "normal (999).png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(common.BadFileError, match=r"normal \(999\)\.png"):
        data.load_dataset(_cfg("busi", tmp_path / "m", tmp_path / "a"), seed=0)
    with pytest.warns(UserWarning, match="skipped 1 bad files"):
        ds = data.load_dataset(_cfg("busi", tmp_path / "m", tmp_path / "b", skip_bad_files=True), seed=0)
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 90


def test_missing_manual_dir_names_dataset_layout_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset(_cfg("ham10000", tmp_path / "absent", tmp_path / "tfds"), seed=0)
    message = str(error.value)
    assert "ham10000" in message and "HAM10000_metadata.csv" in message
    assert "https://doi.org/10.7910/DVN/DBW86T" in message


@pytest.fixture
def kermany_manual(shared_data, tmp_path):
    """The shared train images split by patient into a release-like train / test layout."""
    manual = tmp_path / "chest_xray"
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "chest_xray" / "train" / cls).iterdir())
        for i, f in enumerate(files):
            split = "test" if i % 5 == 0 else "train"  # 10 of 50 per class to test
            (manual / split / cls).mkdir(parents=True, exist_ok=True)
            os.symlink(f, manual / split / cls / f.name)
    return tmp_path


def test_chest_xray_pneumonia_patient_grouped_splits(kermany_manual, tmp_path):
    ds = data.load_dataset(_cfg("chest_xray_pneumonia", kermany_manual, tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["normal", "pneumonia"]
    assert tuple(np.bincount(ds.test.labels)) == (10, 10)
    assert len(ds.train) + len(ds.validation) == 80 and len(ds.validation) >= 2
    builder = tfds_loader.make_builder("chest_xray_pneumonia", data_dir=tmp_path / "tfds")
    assert not _groups(builder, "train") & _groups(builder, "validation")
    assert ds.test.images[0].shape == (224, 224, 1)
    assert patient_id("person1019_virus_1708.jpeg") == "person1019"
    assert patient_id("NORMAL2-IM-0381-0001.jpeg") == "NORMAL2-IM-0381"


def test_chest_xray_three_class_config(kermany_manual, tmp_path):
    ds = data.load_dataset(_cfg("chest_xray_pneumonia", kermany_manual, tmp_path / "tfds", config="three_class"),
                           seed=0)
    assert ds.class_names == ["normal", "bacterial", "viral"]
    counts = sum(np.bincount(s.labels, minlength=3) for s in (ds.train, ds.validation, ds.test))
    assert tuple(counts) == (50, 25, 25)


def test_chest_xray_train_only_copy_carves_a_patient_grouped_test_split(shared_data, tmp_path, capsys):
    """A copy without test/ (as the shared full-resolution set) gets train / validation / test from train."""
    ds = data.load_dataset(_cfg("chest_xray_pneumonia", shared_data / "chest_xray", tmp_path / "tfds"), seed=0)
    assert "has no test/ folder; the test split is carved from train" in capsys.readouterr().out
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 100
    assert 5 <= len(ds.test) <= 15 and set(ds.test.labels.tolist()) == {0, 1}
    builder = tfds_loader.make_builder("chest_xray_pneumonia", data_dir=tmp_path / "tfds")
    train, val, test = (_groups(builder, s) for s in ("train", "validation", "test"))
    assert not (train & test) and not (val & test) and not (train & val)


def test_chest_xray_missing_train_folder(tmp_path):
    (tmp_path / "chest_xray" / "test" / "NORMAL").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"(?s)'train' not found in the manual directory.*chest_xray/\{train,test\}"):
        data.load_dataset(_cfg("chest_xray_pneumonia", tmp_path, tmp_path / "tfds"), seed=0)


def test_ham10000_lesion_grouped_splits_and_subgroups(ham_manual, tmp_path):
    ds = data.load_dataset(_cfg("ham10000", ham_manual, tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    total = sum(np.bincount(s.labels, minlength=7) for s in (ds.train, ds.validation, ds.test))
    assert tuple(total) == (20,) * 7
    assert tuple(np.bincount(ds.train.labels, minlength=7)) == (14,) * 7
    builder = tfds_loader.make_builder("ham10000", data_dir=tmp_path / "tfds")
    lesions = [_groups(builder, s) for s in ("train", "validation", "test")]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    assert set(ds.test.subgroups) == {"sex", "age_group", "localization"}
    assert set(ds.train.subgroups["sex"]) <= {"male", "female", "unknown"}
    assert ds.train.images[0].shape == (150, 200, 3)


def test_ham10000_rows_without_images_are_errors_or_counted(shared_data, tmp_path):
    manual = tmp_path / "ham"
    manual.mkdir()
    os.symlink(shared_data / "ham10000" / "images", manual / "HAM10000_images_part_1")
    lines = (shared_data / "ham10000" / "HAM10000_metadata.csv").read_text().splitlines()
    present = {p.stem for p in (shared_data / "ham10000" / "images").iterdir()}
    absent = [l for l in lines[1:] if l.split(",")[1] not in present][:3]
    kept = [l for l in lines[1:] if l.split(",")[1] in present]
    (manual / "HAM10000_metadata.csv").write_text("\n".join([lines[0], *kept, *absent]) + "\n")
    with pytest.raises(common.BadFileError, match="missing image: .*ISIC_"):
        data.load_dataset(_cfg("ham10000", manual, tmp_path / "a"), seed=0)
    with pytest.warns(UserWarning, match="skipped"):
        ds = data.load_dataset(_cfg("ham10000", manual, tmp_path / "b", skip_bad_files=True), seed=0)
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 140


def test_prepare_data_prints_splits_json_last(shared_data, tmp_path):
    import json
    import subprocess
    import sys

    for cls in ("benign", "malignant", "normal"):
        _link_tree(shared_data / "busi" / cls, tmp_path / "m" / cls)
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "launch" / "prepare_data.py"), "--dataset", "busi",
                             "--manual_dir", str(tmp_path / "m"), "--data_dir", str(tmp_path / "tfds")],
                            capture_output=True, text=True, check=True, cwd=root)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"dataset": "busi", "splits": {
        "train": {"num_examples": 63, "class_counts": {"benign": 21, "malignant": 21, "normal": 21}},
        "validation": {"num_examples": 9, "class_counts": {"benign": 3, "malignant": 3, "normal": 3}},
        "test": {"num_examples": 18, "class_counts": {"benign": 6, "malignant": 6, "normal": 6}}}}


def test_fitzpatrick17k_real_csv_generated_images(shared_data, tmp_path):
    seen = {}

    def keep(row):  # the first 20 rows of each three-partition class
        seen[row["three_partition_label"]] = seen.get(row["three_partition_label"], 0) + 1
        return seen[row["three_partition_label"]] <= 20

    rows = csv_subset(shared_data / "fitzpatrick17k" / "fitzpatrick17k.csv", tmp_path / "m" / "fitzpatrick17k.csv",
                       keep)
    write_random_images([tmp_path / "m" / "images" / f"{r['md5hash']}.jpg" for r in rows], "JPEG")
    ds = data.load_dataset(_cfg("fitzpatrick17k", tmp_path / "m", tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["non-neoplastic", "benign", "malignant"]
    assert tuple(sum(np.bincount(s.labels, minlength=3) for s in (ds.train, ds.validation, ds.test))) == (20, 20, 20)
    skin = np.concatenate([s.subgroups["skin_type"] for s in (ds.train, ds.validation, ds.test)])
    expected = [r["fitzpatrick_scale"] if r["fitzpatrick_scale"] != "-1" else "unknown" for r in rows]
    assert sorted(skin.tolist()) == sorted(expected)
    nine = data.load_dataset(_cfg("fitzpatrick17k", tmp_path / "m", tmp_path / "tfds", config="nine"), seed=0)
    assert nine.num_classes == 9 and len(nine.train) == len(ds.train)
    assert ds.train.images[0].shape == (24, 32, 3)


def test_smdg_real_metadata_generated_images_patient_grouped(shared_data, tmp_path):
    metadata = "metadata - standardized.csv"
    rows = csv_subset(shared_data / "smdg" / metadata, tmp_path / "m" / metadata,
                       lambda r: r["names"].startswith(("PAPILA-", "BEH-1", "CRFO-v4-1")))
    labelled = [r for r in rows if r["types"] in ("0", "1")]
    assert len(labelled) < len(rows)  # glaucoma suspects are in the CSV but not used
    write_random_images([tmp_path / "m" / r["fundus"].lstrip("/") for r in labelled], "PNG")
    ds = data.load_dataset(_cfg("smdg", tmp_path / "m", tmp_path / "tfds"), seed=0)
    assert ds.class_names == ["non_glaucoma", "glaucoma"]
    counts = sum(np.bincount(s.labels, minlength=2) for s in (ds.train, ds.validation, ds.test))
    assert tuple(counts) == (sum(r["types"] == "0" for r in labelled), sum(r["types"] == "1" for r in labelled))
    builder = tfds_loader.make_builder("smdg", data_dir=tmp_path / "tfds")
    patients = [_groups(builder, s) for s in ("train", "validation", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert {"sex", "age_group", "source"} == set(ds.train.subgroups)
    assert "PAPILA" in set(ds.train.subgroups["source"])


def test_iu_xray_real_reports_generated_images(shared_data, tmp_path):
    manual = tmp_path / "m"
    projections, reports = iu_xray_subset(shared_data, manual, 80)
    ds = data.load_dataset(_cfg("iu_xray", manual, tmp_path / "tfds"), seed=0)
    frontal = [r for r in projections if r["projection"] == "Frontal"]
    assert sum(len(s) for s in (ds.train, ds.validation, ds.test)) == len(frontal)
    abnormal = sum(reports[r["uid"]]["MeSH"] != "normal" for r in frontal)
    assert sum(int(s.labels.sum()) for s in (ds.train, ds.validation, ds.test)) == abnormal
    builder = tfds_loader.make_builder("iu_xray", data_dir=tmp_path / "tfds")
    uids = [_groups(builder, s) for s in ("train", "validation", "test")]
    assert not (uids[0] & uids[1] or uids[0] & uids[2] or uids[1] & uids[2])
    record = builder.as_data_source(split="test", decoders={"image": tfds.decode.SkipDecoding()})[0]
    uid = record["group"].decode() if isinstance(record["group"], bytes) else record["group"]
    findings = record["findings"].decode() if isinstance(record["findings"], bytes) else record["findings"]
    assert findings == reports[uid]["findings"]
    assert ds.train.images[0].shape == (24, 32, 1) and ds.train.subgroups == {}


def test_16_bit_images_are_refused_not_clipped():
    """PIL would clip 16-bit pixels at 255 when converting to 8 bits: a white X-ray, silently."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)).save(out, format="PNG")
    with pytest.raises(ValueError, match="pixels of mode I;16 .* convert the images to 8 bits first"):
        common.encode_image(out.getvalue(), max_side=32, channels=1)
