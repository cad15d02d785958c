"""Text-to-image PEFT of Stable Diffusion (peft_jax/t2i/train.py): the U-Net learns, the VAE and text
encoder stay frozen.

    python launch/train_t2i.py --config configs/sd15.py:lora \
        --config.init.checkpoint=/models/stable-diffusion-v1-5 \
        --config.dataset.name=iu_xray --config.dataset.prompt_field=impression --workdir runs/sd15_lora_iu

Rerunning the same command continues from the last checkpoint; SIGTERM saves the current step and
exits with 143. Sample images with launch/generate.py.
"""
from __future__ import annotations

import json
import sys

from peft_jax import runtime

if __name__ == "__main__":
    runtime.setup()  # re-executes with tcmalloc preloaded, before jax is imported

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sd15.py:<method>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/t2i", "Output folder.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from peft_jax.t2i import train
    from peft_jax.train.workdir import Preempted

    try:
        results = train.train(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: schedulers requeue; rerunning continues from the saved step
    print(json.dumps({k: v for k, v in results.items() if k != "losses"}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    runtime.run(main)
