"""ViT-H/14 with LoRA r8 on query and value: the paper's largest model.

Frozen weights are FSDP-sharded over ``mesh.fsdp`` devices; the 32 blocks are stacked and
scanned with rematerialisation so that compile time and activation memory stay small.

    python launch/train.py --config configs/vit_h_lora.py --config.mesh.fsdp=8 --config.dataset.name=ham10000
    python launch/train.py --config configs/vit_h_lora.py --config.mesh.fsdp=8 --config.dry_run=True
"""
from peft_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "vit_h14"
    c.model.image_size = 224
    c.model.scan_layers = True
    c.model.remat = True
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.peft.targets = "qv"
    c.train.lr = 1e-3
    c.train.batch_size = 32
    c.train.num_steps = 2000
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    return c
