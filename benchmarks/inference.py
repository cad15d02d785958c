"""Inference cost of PEFT methods on ViT-B/16: each method unmerged, and merged where it merges,
against the bare backbone, in one process with all forwards interleaved (medians over rounds).

    python benchmarks/inference.py                     # writes its section of BENCHMARKS.md
    python benchmarks/inference.py --methods lora,ia3 --rounds 3 --batch 4

A merged model is the plain ViT again (``peft_jax.adapters.merge``), so it should cost what the
backbone costs; an unmerged method pays for its extra modules at every forward pass.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import write_section  # noqa: E402  (beside this script)


def vit_methods() -> list[str]:
    from peft_jax.adapters.core import METHODS

    return sorted(name for name, m in METHODS.items() if "vit" in m.archs and m.surgery is not None)


def forward(model, batch: int, size: int):
    """A jitted eval forward of ``model`` on a fixed batch; returns a callable timing one call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model.eval()
    graph, state = nnx.split(model)
    run = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    x = jnp.asarray(jax.random.normal(jax.random.key(0), (batch, size, size, 3)))
    jax.block_until_ready(run(state, x))

    def timed() -> float:
        t = time.perf_counter()
        jax.block_until_ready(run(state, x))
        return time.perf_counter() - t

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="", help="comma-separated ViT methods (default: every one that adds "
                                                      "modules)")
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    from peft_jax.runtime import setup

    setup()  # the allocator the launch scripts use
    import jax
    from flax import nnx

    from peft_jax.adapters import apply_peft, merge
    from peft_jax.adapters.core import METHODS
    from peft_jax.config import base_config
    from peft_jax.models import create_model

    methods = args.methods.split(",") if args.methods else vit_methods()

    def build(method: str | None):
        model = create_model(args.model, num_classes=2, image_size=args.size, rngs=nnx.Rngs(0))
        if method is None:
            return model, None
        cfg = base_config().peft
        cfg.method = method
        return apply_peft(model, cfg, rngs=nnx.Rngs(1)), cfg

    timers = {("backbone", "-"): forward(build(None)[0], args.batch, args.size)}
    for method in methods:
        print(f"[inference] {method} ...", file=sys.stderr, flush=True)
        model, cfg = build(method)
        timers[(method, "unmerged")] = forward(model, args.batch, args.size)
        if METHODS[method].merge is not None:
            timers[(method, "merged")] = forward(merge(model, cfg), args.batch, args.size)
    times = {key: [] for key in timers}
    for _ in range(args.rounds):
        for key, timed in timers.items():  # interleaved: machine noise hits every variant alike
            times[key].append(timed())
    median = {key: statistics.median(v) for key, v in times.items()}
    base = median[("backbone", "-")]

    lines = [
        "## Inference: merged and unmerged adapters (`benchmarks/inference.py`)",
        "",
        f"Command: `python benchmarks/inference.py {' '.join(sys.argv[1:])}`".replace(" `", "`").rstrip() + "  ",
        f"Date: {datetime.date.today()}; {os.cpu_count()} CPU cores; jax {jax.__version__}; {args.model}, batch "
        f"{args.batch}, {args.size} px, float32 eval forward; medians over {args.rounds} interleaved rounds. "
        f"Backbone alone: {args.batch / base:.2f} img/s.",
        "",
        "| method | unmerged img/s | unmerged time / backbone | merged img/s | merged time / backbone |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {}
    for method in methods:
        un = median[(method, "unmerged")]
        row = f"| `{method}` | {args.batch / un:.2f} | {un / base:.3f} |"
        if (method, "merged") in median:
            m = median[(method, "merged")]
            row += f" {args.batch / m:.2f} | {m / base:.3f} |"
            summary[method] = {"unmerged": round(un / base, 3), "merged": round(m / base, 3)}
        else:
            row += " does not merge | |"
            summary[method] = {"unmerged": round(un / base, 3)}
        lines.append(row)
    write_section(pathlib.Path(args.out), "## Inference: merged and unmerged adapters", "\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
