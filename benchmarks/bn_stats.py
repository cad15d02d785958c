"""Which ``train.bn_stats`` default suits PEFT on a pre-trained ResNet: frozen or updating statistics?

    python benchmarks/bn_stats.py --workdir runs/bn_stats [--methods ssf,bn_tune] [--seeds 0,1,2]

Pre-trains ResNet-18 on PneumoniaMNIST (full fine-tuning, 28 px), transfers it to BreastMNIST with
each PEFT method under both settings and several seeds, and writes the mean test macro-F1 / AUROC
table into BENCHMARKS.md. Every stage is a resumable training workdir.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import score_row, write_section  # noqa: E402  (beside this script)
from peft_jax import runtime  # noqa: E402

runtime.setup()

HEADING = "## BatchNorm statistics under PEFT (`benchmarks/bn_stats.py`)"


def config(**changes):
    from peft_jax.config import base_config, with_values

    c = base_config()
    c.model.name, c.model.image_size = "resnet18", 28
    c.dataset.name = "breastmnist"
    c.train.update(batch_size=32, eval_every=25, checkpoint_every=1000, log_every=25, patience=0, progress=False,
                   warmup_steps=10, num_steps=200, lr=2e-2)
    return with_values(c, changes, "benchmarks/bn_stats.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bn_stats")
    parser.add_argument("--methods", default="ssf,bn_tune")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    from peft_jax.train import classify

    root = pathlib.Path(args.workdir)
    pre = classify.train_and_evaluate(config(**{"dataset.name": "pneumoniamnist", "peft.method": "full", "train.lr": 1e-3,
                                            "train.num_steps": 300, "train.batch_size": 64,
                                            "train.eval_every": 100}), root / "pretrain")
    rows = []
    for method in args.methods.split(","):
        for bn in ("update", "frozen"):
            runs = [classify.train_and_evaluate(config(**{"peft.method": method, "train.bn_stats": bn, "seed": int(s),
                                                      "init.checkpoint": str(root / "pretrain" / "adapter")}),
                                            root / f"{method}_{bn}_{s}") for s in args.seeds.split(",")]
            rows.append(score_row([method, bn], runs))
            print(rows[-1], flush=True)
    section = "\n".join([
        HEADING, "",
        f"Command: `python benchmarks/bn_stats.py {' '.join(sys.argv[1:])}`. ResNet-18 pre-trained on PneumoniaMNIST "
        f"(test macro-F1 {pre['test']['macro_f1']:.3f}), transferred to BreastMNIST (28 px, 200 steps, lr 2e-2, "
        "batch 32); mean ± std over seeds of the test scores.", "",
        "| method | train.bn_stats | test macro-F1 | test AUROC | seeds |", "|---|---|---:|---:|---:|", *rows, ""])
    write_section(pathlib.Path(args.out), HEADING, section)


if __name__ == "__main__":
    main()
