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

from peft_jax import runtime

if __name__ == "__main__":
    runtime.setup()  # re-executes with tcmalloc preloaded, before jax is imported

from absl import app, flags  # noqa: E402

_WEIGHTS = flags.DEFINE_string("weights", "inception_v3.fid",
                               "pytorch-fid Inception weights: a .pth/.safetensors path or the registered name.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per Inception batch.", lower_bound=1)
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the statistics (mu, sigma) of REAL to this .npz.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar per folder.")


def main(argv: list[str]) -> None:
    from peft_jax.metrics.inception import compare

    args, save = argv[1:], _SAVE_STATS.value
    if not (len(args) == 2 or (len(args) == 1 and save)):
        raise app.UsageError("expected REAL FAKE (image folders or statistics .npz files), "
                             "or REAL --save_stats OUT.npz")
    record = compare(args, weights=_WEIGHTS.value, batch_size=_BATCH_SIZE.value, save=save,
                     progress=_PROGRESS.value)
    if "fid" in record:
        print(f"FID: {record['fid']:.4f}")
    print(json.dumps(record))


if __name__ == "__main__":
    runtime.run(main)
