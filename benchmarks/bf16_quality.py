"""Does ``train.compute_dtype=bfloat16`` train as well as float32? The quickstart's experiment in both.

    python benchmarks/bf16_quality.py --workdir runs/bf16_quality [--seeds 0,1,2]

The quickstart's small ViT (configs/quickstart.py) is pre-trained on PneumoniaMNIST in float32 once,
then transferred to BreastMNIST (25% of the labels, the quickstart's learning rate per method) by
full fine-tuning and by LoRA, in float32 and in bfloat16 compute (float32 weights and optimizer
state), over several seeds. The mean ± std test macro-F1 / AUROC table goes into BENCHMARKS.md.
Every run is a resumable training workdir.
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

HEADING = "## bfloat16 vs float32 training quality (`benchmarks/bf16_quality.py`)"


def config(changes: dict):
    sys.path.insert(0, str(ROOT / "configs"))
    from quickstart import get_config

    c = get_config("vit")  # the ViT miniature: its products are where bf16 matters
    c.train.progress = False
    c.update_from_flattened_dict(changes)
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bf16_quality")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    from peft_jax.train import classify

    root = pathlib.Path(args.workdir)
    c = config({})
    pre = classify.train_and_evaluate(config({
        "dataset.name": c.quickstart.pretrain_dataset, "dataset.fraction": 1.0, "peft.method": "full",
        "train.num_steps": c.quickstart.pretrain_steps, "train.lr": c.quickstart.pretrain_lr,
        "train.batch_size": c.quickstart.pretrain_batch_size}), root / "pretrain")
    rows = []
    for method in args.methods.split(","):
        for dtype in ("float32", "bfloat16"):
            runs = [classify.train_and_evaluate(config({"peft.method": method, "train.compute_dtype": dtype,
                                                    "train.lr": c.quickstart.lr[method],
                                                    "seed": int(s), "init.checkpoint": str(root / "pretrain" / "adapter")}),
                                            root / f"{method}_{dtype}_{s}") for s in args.seeds.split(",")]
            rows.append(score_row([method, dtype], runs))
            print(rows[-1], flush=True)
    section = "\n".join([
        HEADING, "",
        f"Command: `python benchmarks/bf16_quality.py {' '.join(sys.argv[1:])}`. The quickstart's ViT pre-trained on "
        f"PneumoniaMNIST in float32 (test macro-F1 {pre['test']['macro_f1']:.3f}), transferred to BreastMNIST (25% of "
        "the labels, 100 steps) in each compute dtype; mean ± std over seeds of the test scores.", "",
        "| method | train.compute_dtype | test macro-F1 | test AUROC | seeds |", "|---|---|---:|---:|---:|", *rows, ""])
    write_section(pathlib.Path(args.out), HEADING, section)


if __name__ == "__main__":
    main()
