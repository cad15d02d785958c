"""The mini study: Dutt et al.'s experiment in miniature on MedMNIST, on 2 CPU cores.

A small ViT (ViT-Ti width, depth 4, 4-pixel patches on 28 px images) is pre-trained once on
PneumoniaMNIST (chest X-ray), then transferred to BreastMNIST (breast ultrasound) with 10%,
25% and 100% of its training labels by a linear probe, BitFit, LoRA, SSF and full
fine-tuning, two seeds each, with fixed hyper-parameters (no sweep, to fit the CPU budget).

    python launch/benchmark.py --config configs/benchmark/mini.py --workdir runs/mini --report_dir results/mini
"""
from peft_jax.config import base_config
from peft_jax.hpo import benchmark_section, sweep_section


def get_config():
    c = base_config()
    c.model.name = "vit_ti16"
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.depth = 4
    c.dataset.name = "breastmnist"
    c.train.num_steps = 100
    c.train.batch_size = 32
    c.train.warmup_steps = 12
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 20
    c.train.patience = 0  # short runs: keep the best of all evaluations
    c.train.progress = False

    c.benchmark = benchmark_section(
        methods="linear,bitfit,lora,ssf,full", models="vit_ti16", datasets="breastmnist",
        fractions="0.1,0.25,1.0", seeds="0,1",
        # Learning rates as in the quickstart: probes and small adapters take larger steps than full fine-tuning.
        overrides={"linear": "train.lr=1e-2", "bitfit": "train.lr=5e-3", "lora": "train.lr=5e-3; peft.rank=8",
                   "ssf": "train.lr=5e-3", "full": "train.lr=5e-4"})
    c.benchmark.pretrain_dataset = "pneumoniamnist"
    c.benchmark.pretrain_steps = 240
    c.benchmark.pretrain_lr = 1e-3
    c.benchmark.pretrain_batch_size = 64
    # benchmark.search="sweep" searches these instead of using the learning rates above (much slower).
    c.sweep = sweep_section(num_trials=6, min_resource=25, max_resource=100, space={
        "common": "train.lr=log(1e-4, 3e-2); train.weight_decay=log(1e-6, 1e-2)",
        "lora": "peft.rank=choice(4, 8, 16)"})
    return c
