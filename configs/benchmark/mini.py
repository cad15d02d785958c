"""The mini study: Dutt et al.'s experiment in miniature on MedMNIST, on 2 CPU cores.

A small ViT (ViT-Ti width, depth 4, 4-pixel patches on 28 px images) is pre-trained once on
PneumoniaMNIST (chest X-ray), then transferred to BreastMNIST (breast ultrasound) with 10%,
25% and 100% of its training labels by a linear probe, BitFit, LoRA, SSF and full
fine-tuning, two seeds each, with fixed hyper-parameters (no sweep, to fit the CPU budget).

    python launch/benchmark.py --config configs/benchmark/mini.py --workdir runs/mini --report_dir results/mini

`:ham` is the same ViT on the full HAM10000 (dermoscopy, 7 classes; $PEFT_JAX_DATA/ham10000_full) at 2% and
100% of the labels, three seeds, budgets in epochs, and each final run's predictions explained on 32 test
images and scored against the lesion masks (does a PEFT model look at the lesion more or less than a fully
fine-tuned one?):

    python launch/benchmark.py --config configs/benchmark/mini.py:ham --workdir runs/mini_ham --report_dir results/mini_ham
"""
import ml_collections

from peft_jax.config import base_config
from peft_jax.hpo import benchmark_section, release_dir_overrides, sweep_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
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
    if arg == "ham":
        ham(c)
    elif arg is not None:
        raise ValueError(f"configs/benchmark/mini.py:{arg} is unknown; valid: ham (or no argument)")
    return c


def ham(c: ml_collections.ConfigDict) -> None:
    """HAM10000 at 2% (140 training images) and 100%: 4 epochs, at least 100 and at most 800 steps."""
    c.benchmark.datasets = "ham10000"
    c.benchmark.fractions = "0.02,1.0"
    c.benchmark.seeds = "0,1,2"
    c.benchmark.overrides.update(release_dir_overrides())
    c.benchmark.epochs = 4.0
    c.benchmark.min_steps = 100
    c.benchmark.max_steps = 800
    c.benchmark.evals_per_run = 5
    c.benchmark.explain_images = 32
