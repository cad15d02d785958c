"""Dutt et al.'s classification protocol on ViTs: every ViT PEFT method of peft_jax on the five
classification datasets, ImageNet-21k ViT-B/16, data fractions 5-100%, ASHA per cell, three seeds.

For a machine with accelerators and the data (see each builder's docstring for where to get it):

    python launch/benchmark.py --config configs/benchmark/paper_vit.py --workdir runs/paper_vit --workers 4
    python launch/benchmark.py --config configs/benchmark/paper_vit.py --workdir runs/paper_vit --dry_run
    python launch/benchmark.py --config configs/benchmark/paper_vit.py --config.benchmark.models=vit_l16,vit_h14 ...

Each cell (model, dataset, method, fraction) runs an ASHA sweep of 16 trials (rungs at 200, 800
and 3200 steps, reduction factor 4) on the first seed, then re-trains the best configuration
with seeds 0, 1, 2 for 3200 steps with early stopping on validation macro-F1. The step budget,
fractions and search ranges are this project's choices in the spirit of the paper, not its
exact values.
"""
from peft_jax.config import base_config
from peft_jax.hpo import benchmark_section, sweep_section

VIT_METHODS = ("linear,full,bitfit,ln_tune,attention_tune,lora,dora,ia3,ssf,difffit,vpt_shallow,vpt_deep,"
               "adapter_houlsby,adapter_pfeiffer,adaptformer,convpass,repadapter,fact_tt,fact_tk")
DATASETS = "busi,chest_xray_pneumonia,ham10000,fitzpatrick17k,smdg"


def get_config():
    c = base_config()
    c.model.name = "vit_b16"
    c.model.image_size = 224
    c.train.num_steps = 3200
    c.train.batch_size = 32
    c.train.warmup_steps = 200
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.log_every = 50
    c.train.patience = 5
    c.train.compute_dtype = "bfloat16"

    c.benchmark = benchmark_section(
        methods=VIT_METHODS, models="vit_b16", datasets=DATASETS, fractions="0.05,0.1,0.25,1.0", seeds="0,1,2",
        overrides={
            "vit_b16": "init.checkpoint=vit_b16.augreg_in21k",
            "vit_l16": "init.checkpoint=vit_l16.augreg_in21k; model.scan_layers=True; model.remat=True",
            "vit_h14": "init.checkpoint=vit_h14.i21k; model.scan_layers=True; model.remat=True",
        })
    c.benchmark.search = "sweep"
    c.sweep = sweep_section(num_trials=16, min_resource=200, max_resource=3200, space={
        "common": "train.lr=log(1e-4, 3e-2); train.weight_decay=log(1e-6, 1e-1)",
        "full": "train.lr=log(1e-6, 1e-3)",
        "attention_tune": "train.lr=log(1e-6, 1e-3)",
        "lora": "peft.rank=choice(4, 8, 16, 32); peft.alpha=choice(8.0, 16.0, 32.0)",
        "dora": "peft.rank=choice(4, 8, 16, 32); peft.alpha=choice(8.0, 16.0, 32.0)",
        "vpt_shallow": "peft.num_tokens=choice(5, 10, 50, 100)",
        "vpt_deep": "peft.num_tokens=choice(5, 10, 50, 100)",
        "adapter_houlsby": "peft.bottleneck=choice(8, 16, 32, 64, 128)",
        "adapter_pfeiffer": "peft.bottleneck=choice(8, 16, 32, 64, 128)",
        "adaptformer": "peft.bottleneck=choice(8, 16, 32, 64, 128)",
        "convpass": "peft.bottleneck=choice(8, 16, 32, 64)",
        "fact_tt": "peft.rank=choice(8, 16, 32)",
        "fact_tk": "peft.rank=choice(8, 16, 32)",
        "repadapter": "peft.bottleneck=choice(8, 16, 32, 64); peft.groups=choice(1, 2, 4)",
    })
    return c
