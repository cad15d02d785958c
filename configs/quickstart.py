"""The quickstart: a miniature of Dutt et al.'s experiment on MedMNIST, on 2 CPU cores.

No pretrained weights can be downloaded everywhere, so a small ViT (ViT-Ti width, depth 4,
4-pixel patches on 28 px images) is first pre-trained on PneumoniaMNIST (chest X-ray), then
transferred to BreastMNIST (breast ultrasound) with 25% of its training labels by a linear
probe, full fine-tuning, LoRA and SSF, against training from scratch.

    python launch/quickstart.py            # writes runs/quickstart/, prints the table
    python launch/train.py --config configs/quickstart.py --config.peft.method=ssf   # one transfer run
"""
import ml_collections

from peft_jax.config import base_config


def get_config():
    c = base_config()
    c.model.name = "vit_ti16"
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.depth = 4
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.dataset.name = "breastmnist"
    c.dataset.fraction = 0.25
    c.train.num_steps = 100
    c.train.batch_size = 32
    c.train.lr = 5e-3
    c.train.warmup_steps = 12
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 20
    c.train.patience = 0  # short runs: keep the best of all evaluations

    c.quickstart = ml_collections.ConfigDict()
    c.quickstart.pretrain_dataset = "pneumoniamnist"
    c.quickstart.pretrain_steps = 240
    c.quickstart.pretrain_lr = 1e-3
    c.quickstart.pretrain_batch_size = 64
    c.quickstart.methods = "linear,full,lora,ssf,scratch"  # "scratch": full training from random weights
    # Learning rate per method (small adapters and probes take larger steps than full fine-tuning).
    c.quickstart.lr = ml_collections.ConfigDict(
        {"linear": 1e-2, "full": 5e-4, "lora": 5e-3, "ssf": 5e-3, "scratch": 1e-3})
    return c
