"""Fréchet Inception Distance between two image folders (or saved statistics), with pytorch-fid's Inception-v3.

    python launch/fid.py REAL FAKE [--weights inception_v3.fid] [--batch_size 32] [--save_stats real.npz]
    python launch/fid.py REAL --save_stats real.npz        # only the reference statistics, once

REAL and FAKE are folders searched recursively for png/jpg images, or statistics .npz files
(``mu``, ``sigma``: ours or pytorch-fid's). Every image is read as RGB and resized bilinearly
to 299 x 299 as pytorch-fid does. ``--weights`` is the path of ``pt_inception-2015-12-05-6726825d.pth``
(or a .safetensors copy) or the registered name, looked up in the cache ($PEFT_JAX_CACHE,
else ~/.cache/peft_jax) and downloaded there if absent. ``--save_stats`` writes the statistics of REAL.
Prints ``FID: <value>`` and, as the last line, one JSON object:
  {"fid": F, "real": REAL, "fake": FAKE, "num_real": N or null, "num_fake": N or null, "weights": W or null}
(counts are null for a side given as statistics, weights when both are).
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from peft_jax import runtime  # noqa: E402  (sets up the allocator and platform before jax is imported)

if __name__ == "__main__":
    runtime.setup()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_WEIGHTS = flags.DEFINE_string("weights", "inception_v3.fid",
                               "pytorch-fid Inception weights: a .pth/.safetensors path or the registered name.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per Inception batch.", lower_bound=1)
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the statistics (mu, sigma) of REAL to this .npz.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar per folder.")


def open_source(source: str) -> tuple[np.ndarray, np.ndarray] | list[pathlib.Path]:
    """A side of the FID, checked before any image is processed: its (mu, sigma) if a .npz, else its image files."""
    from peft_jax.metrics import load_statistics
    from peft_jax.metrics.inception import image_files

    path = pathlib.Path(source).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such statistics file")
        return load_statistics(path)
    files = image_files(path)
    if len(files) < 2:
        raise ValueError(f"{path}: FID needs at least 2 images, found {len(files)}")
    return files


def main(argv: list[str]) -> None:
    from peft_jax.metrics import feature_statistics, frechet_distance, save_statistics
    from peft_jax.metrics.inception import folder_features, inception_features
    from peft_jax.models import from_pretrained

    args, save = argv[1:], _SAVE_STATS.value
    if not (len(args) == 2 or (len(args) == 1 and save)):
        raise app.UsageError("expected REAL FAKE (image folders or statistics .npz files), "
                             "or REAL --save_stats OUT.npz")
    if save and not save.endswith(".npz"):
        raise ValueError(f"--save_stats must name a .npz file, got {save}")
    sources = [open_source(a) for a in args]
    if save and isinstance(sources[0], tuple):
        raise ValueError(f"--save_stats needs REAL to be an image folder, not statistics ({args[0]})")
    features, weights = None, None  # two statistics files need no network
    if any(isinstance(s, list) for s in sources):
        weights = _WEIGHTS.value
        features = inception_features(from_pretrained("inception_v3_fid", weights), _BATCH_SIZE.value)

    stats, counts = [], []
    for arg, source in zip(args, sources):
        if isinstance(source, tuple):
            stats.append(source)
            counts.append(None)
            continue
        feats = folder_features(source, features, batch_size=_BATCH_SIZE.value, progress=_PROGRESS.value,
                                desc=pathlib.Path(arg).name or arg)
        stats.append(feature_statistics(feats))
        counts.append(len(source))
    if save:
        save_statistics(save, *stats[0], counts[0])
        print(f"saved the statistics of {counts[0]} images of {args[0]} to {save}", file=sys.stderr)
        if len(args) == 1:
            print(json.dumps({"saved_stats": save, "real": args[0], "num_real": counts[0], "weights": weights}))
            return
    value = frechet_distance(*stats[0], *stats[1])
    print(f"FID: {value:.4f}")
    print(json.dumps({"fid": value, "real": args[0], "fake": args[1], "num_real": counts[0], "num_fake": counts[1],
                      "weights": weights}))


if __name__ == "__main__":
    runtime.run(main)
