"""Prepares a dataset from its release files and prints its splits and class counts.

  python launch/prepare_data.py --dataset busi --manual_dir ~/Downloads/busi --data_dir ~/tensorflow_datasets

The last line printed is one JSON object:
  {"dataset": NAME, "splits": {"train": {"num_examples": N, "class_counts": {...}}, "validation": ..., "test": ...}}
MedMNIST names work too (`--manual_dir` is then ignored; `--data_dir` is where the .npz is looked for).
"""
from __future__ import annotations

import argparse
import json
import sys

import ml_collections

from peft_jax import data, errors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(data.dataset_names())}")
    parser.add_argument("--manual_dir", default=None, help="folder holding the release files (TFDS datasets)")
    parser.add_argument("--data_dir", default=None, help="where the prepared dataset is written / read")
    parser.add_argument("--config", default=None, help="builder config, e.g. three_class for chest_xray_pneumonia")
    parser.add_argument("--size", type=int, default=28, help="MedMNIST image size (28, 64, 128 or 224)")
    parser.add_argument("--skip_bad_files", action="store_true", help="skip unreadable / missing images with a warning")
    parser.add_argument("--no_download", action="store_true", help="never download (MedMNIST)")
    args = parser.parse_args(argv)
    cfg = ml_collections.ConfigDict(dict(
        name=args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir, config=args.config, size=args.size,
        fraction=1.0, download=not args.no_download, skip_bad_files=args.skip_bad_files))
    splits = data.load_dataset(cfg, seed=0)
    summary = {"dataset": args.dataset, "splits": {
        name: {"num_examples": len(split), "class_counts": data.class_counts(split, splits.class_names)}
        for name, split in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}}
    sys.stdout.flush()
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    errors.guard(main)()  # a bad dataset name or folder: one error line, exit code 2
