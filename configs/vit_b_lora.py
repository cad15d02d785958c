"""ViT-B/16 with LoRA (rank 8 on query and value), the paper's strongest ViT method family.

python launch/train.py --config configs/vit_b_lora.py --config.dataset.name=breastmnist
"""
from peft_jax.config import base_config


def get_config():
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
    return c
