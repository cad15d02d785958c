"""``--config.a.b=None`` resets an optional field from the command line (ml_collections alone cannot)."""
import pathlib
import subprocess
import sys

import pytest

from peft_jax import runtime
from peft_jax.config import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_none_overrides_leave_argv_and_reset_optional_fields():
    argv = ["train.py", "--config", "c.py", "--config.model.patch_size=None", "--config.train.lr=1e-3"]
    assert runtime.pop_none_overrides(argv) == ["model.patch_size"]
    assert argv == ["train.py", "--config", "c.py", "--config.train.lr=1e-3"]
    cfg = base_config()
    cfg.model.patch_size = 4
    cfg.lock()
    assert runtime.reset_optional_fields(cfg, ["model.patch_size"]).model.patch_size is None
    with pytest.raises(ValueError, match="train.lr is not optional; give it a value"):
        runtime.reset_optional_fields(cfg, ["train.lr"])
    with pytest.raises(ValueError, match="unknown config key 'model.patch_sise'"):
        runtime.reset_optional_fields(cfg, ["model.patch_sise"])


def test_the_command_line_reset_is_one_error_line_for_a_required_field(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" /
                          "vit_b_lora.py"), "--config.train.lr=None", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: --config.train.lr=None: train.lr is not optional; give it a value")
    assert not (tmp_path / "w").exists()
