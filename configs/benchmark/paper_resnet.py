"""Dutt et al.'s classification protocol on ResNet-50: every CNN PEFT method of peft_jax on the
five classification datasets, torchvision ImageNet-1k weights, data fractions 5-100%, ASHA per
cell, three seeds.

    python launch/benchmark.py --config configs/benchmark/paper_resnet.py --workdir runs/paper_resnet --workers 4
    python launch/benchmark.py --config configs/benchmark/paper_resnet.py --workdir runs/paper_resnet --dry_run

The protocol is that of configs/benchmark/paper_vit.py (16-trial ASHA sweeps with rungs at 200,
800 and 3200 steps, then seeds 0, 1, 2); step budget, fractions and ranges are this project's
choices in the spirit of the paper, not its exact values.
"""
from peft_jax.config import base_config
from peft_jax.hpo import benchmark_section, sweep_section

CNN_METHODS = "linear,full,bitfit,bn_tune,ssf,partial,film,tsa,conv_adapter,residual_adapter,lora_conv"
DATASETS = "busi,chest_xray_pneumonia,ham10000,fitzpatrick17k,smdg"


def get_config():
    c = base_config()
    c.model.name = "resnet50"
    c.model.image_size = 224
    c.train.num_steps = 3200
    c.train.batch_size = 32
    c.train.warmup_steps = 200
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.log_every = 50
    c.train.patience = 5

    c.benchmark = benchmark_section(
        methods=CNN_METHODS, models="resnet50", datasets=DATASETS, fractions="0.05,0.1,0.25,1.0", seeds="0,1,2",
        overrides={"resnet50": "init.checkpoint=resnet50.tv_in1k",
                   "resnet18": "init.checkpoint=resnet18.tv_in1k",
                   "resnet101": "init.checkpoint=resnet101.tv_in1k"})
    c.benchmark.search = "sweep"
    c.sweep = sweep_section(num_trials=16, min_resource=200, max_resource=3200, space={
        "common": "train.lr=log(1e-4, 3e-2); train.weight_decay=log(1e-6, 1e-1)",
        "full": "train.lr=log(1e-5, 3e-3)",
        "partial": "train.lr=log(1e-5, 3e-3); peft.num_blocks=choice(1, 2, 3)",
        "tsa": "peft.tsa_form=choice(matrix, channel)",
        "conv_adapter": "peft.reduction=choice(4, 8, 16)",
        "lora_conv": "peft.rank=choice(4, 8, 16)",
    })
    return c
