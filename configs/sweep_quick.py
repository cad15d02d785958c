"""A quick ASHA sweep on MedMNIST: 8 tiny trials on 2 CPU cores in a few minutes, some pruned.

A 2-block ViT-Ti (4-pixel patches on 28 px images) is fully trained on PneumoniaMNIST (chest X-ray) for at
most 80 steps; ASHA (reduction factor 4) compares the trials at step 20 (its one rung inside the
budget: the next, 80, is the budget's end) and stops the ones that fall behind, saving 60 steps each.

    python launch/sweep.py --config configs/sweep_quick.py --workdir runs/sweep_quick [--workers 2]
    python launch/train.py --config configs/sweep_quick.py --flagfile runs/sweep_quick/best_overrides.txt
"""
from peft_jax.config import base_config
from peft_jax.hpo import sweep_section


def get_config():
    c = base_config()
    c.model.name = "vit_ti16"
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.depth = 2
    c.peft.method = "full"
    c.dataset.name = "pneumoniamnist"
    c.train.num_steps = 80
    c.train.batch_size = 16
    c.train.warmup_steps = 8
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 20
    c.train.patience = 2
    c.sweep = sweep_section(num_trials=8, min_resource=20, max_resource=80, space={
        "common": "train.lr=log(1e-4, 3e-2); train.weight_decay=log(1e-6, 1e-2)",
        "lora": "peft.rank=choice(4, 8, 16); peft.alpha=choice(8.0, 16.0)",
        "adapter_houlsby": "peft.bottleneck=choice(8, 16, 32, 64)",
        "vpt_shallow": "peft.num_tokens=choice(5, 10, 20)",
        "vpt_deep": "peft.num_tokens=choice(5, 10, 20)",
    })
    return c
