"""ResNet-50 with SSF (scale and shift after every convolution and BatchNorm), the paper's best CNN method.

    python launch/train.py --config configs/resnet50_ssf.py --config.dataset.name=breastmnist
    python launch/train.py --config configs/resnet50_ssf.py:tiny --workdir runs/tiny_resnet   # CPU-sized: ResNet-18, 32 px

`:tiny` runs a ResNet-18 (the family's smallest member, as the ViT's `:tiny` keeps 2 blocks) on 28 px
BreastMNIST resized to 32 px for 40 steps (any CNN method: add --config.peft.method=...). ResNet-50
itself takes 78 s there, mostly initialisation and compilation: `--config.model.name=resnet50`.
"""
from peft_jax.config import base_config, tiny_run


def get_config(arg: str | None = None):
    if arg not in (None, "tiny"):
        raise ValueError(f"configs/resnet50_ssf.py:{arg} is unknown; valid: tiny")
    c = base_config()
    c.model.name = "resnet50"
    c.model.image_size = 224
    c.peft.method = "ssf"
    c.train.lr = 5e-3
    c.train.batch_size = 32
    c.train.num_steps = 1000
    if arg == "tiny":
        tiny_run(c)
        c.model.name = "resnet18"
        c.model.image_size = 32
    return c
