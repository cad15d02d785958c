"""EfficientNet-Lite0 with SSF, from its ImageNet-1k weights (shipped in a core dependency: no network).

    python launch/train.py --config configs/efficientnet_lite0_ssf.py --config.dataset.name=breastmnist
    python launch/train.py --config configs/efficientnet_lite0_ssf.py:tiny --workdir runs/tiny_lite0   # 32 px

`:tiny` runs it on 28 px BreastMNIST resized to 32 px for 40 steps (any CNN method:
add --config.peft.method=...). The ImageNet BatchNorm statistics stay frozen (train.bn_stats).
"""
from peft_jax.config import base_config, tiny_run


def get_config(arg: str | None = None):
    if arg not in (None, "tiny"):
        raise ValueError(f"configs/efficientnet_lite0_ssf.py:{arg} is unknown; valid: tiny")
    c = base_config()
    c.model.name = "efficientnet_lite0"
    c.model.image_size = 224
    c.init.checkpoint = "efficientnet_lite0.in1k"
    c.peft.method = "ssf"
    c.train.bn_stats = "frozen"
    c.train.lr = 5e-3
    c.train.batch_size = 32
    c.train.num_steps = 1000
    if arg == "tiny":
        tiny_run(c)
        c.model.image_size = 32
    return c
