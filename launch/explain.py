"""Explain a finished run: attribution maps on test images, scored against the dataset's lesion masks.

    python launch/explain.py --workdir runs/ham_lora [--split test] [--num_images 16] [--method gradcam,ig]

Writes WORKDIR/explanations.json (scores with bootstrap intervals) and WORKDIR/explanations/*.png.
"""
from __future__ import annotations

import pathlib

from peft_jax import runtime  # sets up the allocator before jax is imported

runtime.setup()

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training run (results.json, adapter/).")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose images are explained.")
_NUM = flags.DEFINE_integer("num_images", 16, "Images explained (a fixed-seed draw: the same for every run).")
_METHOD = flags.DEFINE_list("method", [], "gradcam, gxi, ig, rollout (comma-separated; default: all the model "
                            "supports).")
_STEPS = flags.DEFINE_integer("ig_steps", None, "Integrated-gradients steps (default 16; more: closer to "
                              "completeness).")
_BASELINE = flags.DEFINE_string("ig_baseline", "black", "Integrated-gradients baseline: black, mean or a number.")
_MASK_DIR = flags.DEFINE_string("mask_dir", None, "Mask folder (default: the dataset's, in its manual directory).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from peft_jax.explain.run import explain_run

    steps = {} if _STEPS.value is None else {"ig_steps": _STEPS.value}
    result = explain_run(_WORKDIR.value, split=_SPLIT.value, num_images=_NUM.value, methods=_METHOD.value,
                         baseline=_BASELINE.value, mask_dir=_MASK_DIR.value, **steps)
    print(f"{len(result['images'])} {result['split']} images; chance (mask area) {result['chance']['mean']:.3f}")
    for method, s in result["attributions"].items():
        print(f"{method:8s} " + "  ".join(f"{k} {_interval(s[k])}" for k in ("energy", "pointing", "auroc")))
    print(f"wrote {pathlib.Path(result['run']) / 'explanations.json'} and explanations/ in {result['seconds']:.0f} s")


def _interval(s: dict) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    runtime.run(main)
