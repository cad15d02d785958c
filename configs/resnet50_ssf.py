"""ResNet-50 with SSF (scale and shift after every convolution and BatchNorm), the paper's best CNN method.

    python launch/train.py --config configs/resnet50_ssf.py --config.dataset.name=breastmnist
"""
from peft_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "resnet50"
    c.model.image_size = 224
    c.peft.method = "ssf"
    c.train.lr = 5e-3
    c.train.batch_size = 32
    c.train.num_steps = 1000
    return c
