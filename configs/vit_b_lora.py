"""ViT-B/16 with LoRA (rank 8 on query and value), the paper's strongest ViT method family.

    python launch/train.py --config configs/vit_b_lora.py --config.dataset.name=breastmnist
    python launch/train.py --config configs/vit_b_lora.py:tiny --workdir runs/tiny_vit   # CPU-sized: 28 px, 2 blocks

`:tiny` keeps ViT-B's width but runs 2 blocks on 4-pixel patches of 28 px BreastMNIST for 40 steps
(any ViT method: add --config.peft.method=...).
"""
from peft_jax.config import base_config, tiny_run


def get_config(arg: str | None = None):
    if arg not in (None, "tiny"):
        raise ValueError(f"configs/vit_b_lora.py:{arg} is unknown; valid: tiny")
    c = base_config()
    c.model.name = "vit_b16"
    c.model.image_size = 224
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.peft.targets = "qv"
    c.train.lr = 1e-3
    c.train.num_steps = 1000
    c.train.batch_size = 32
    if arg == "tiny":
        tiny_run(c)
        c.model.image_size, c.model.patch_size, c.model.depth = 28, 4, 2
    return c
