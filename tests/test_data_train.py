"""launch/train.py end to end on a TFDS-built dataset: prepared from its release layout, subgroups in results.json."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_on_ham10000_release_layout_reports_subgroups(ham_manual, tmp_path):
    manual = ham_manual
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs' / 'vit_b_lora.py'}",
           "--config.dataset.name=ham10000", f"--config.dataset.manual_dir={manual}",
           f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.model.name=vit_ti16",
           "--config.model.image_size=28", "--config.model.patch_size=4", "--config.model.depth=2",
           "--config.train.batch_size=8", "--config.train.num_steps=4", "--config.train.eval_every=4",
           "--config.train.progress=False", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PEFT_JAX_TCMALLOC="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "ham10000" and results["train_examples"] == 98  # 14 of 20 per class
    assert results["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert results["test"]["num_examples"] == 28 and results["val"]["num_examples"] == 14
    subgroups = results["test"]["subgroups"]
    assert set(subgroups) == {"sex", "age_group", "localization"}
    assert sum(g["n"] for g in subgroups["sex"]["groups"].values()) == 28
    assert (tmp_path / "tfds" / "ham10000" / "1.0.0" / "dataset_info.json").is_file()
