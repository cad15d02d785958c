"""The quickstart: ImageNet EfficientNet-Lite0 transferred to BreastMNIST at a low label fraction by
several PEFT methods, against full fine-tuning, training from scratch and the majority class.

    python launch/quickstart.py [--config configs/quickstart.py[:vit]] [--workdir runs/quickstart]

``configs/quickstart.py:vit`` is the earlier miniature (a small ViT pre-trained here on
PneumoniaMNIST). An interrupted quickstart resumes where it stopped.
"""
from __future__ import annotations

import pathlib

from peft_jax import runtime  # sets up the allocator before jax is imported

runtime.setup()

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"),
    "Quickstart config file (':vit' after the path: the ViT miniature).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output folder.")


def main(argv: list[str]) -> None:
    del argv
    cfg = runtime.checked_config(_CONFIG.value, free=("quickstart",))
    from peft_jax.train import quickstart

    quickstart.run(cfg, _WORKDIR.value)


if __name__ == "__main__":
    runtime.run(main)
