"""Where ResNet-50's training time goes: every convolution, forward and both backward products,
in JAX (as peft_jax runs it) and in torch (oneDNN, channels-last), side by side in one process.

    python benchmarks/conv_profile.py [--rounds 5] [--batch 8]

The distinct convolutions are read off peft_jax's ResNet-50 by tracing it at 224 px. For each one,
three jitted JAX functions (output, input gradient, kernel gradient) and the three torch calls that
autograd makes (``conv2d`` and ``aten.convolution_backward`` with one output each) are timed
interleaved; medians over rounds. Rows are weighted by how often the convolution occurs in the
network, so the totals are the convolution time of one full fine-tuning step. Writes its section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_md import write_section  # noqa: E402  (beside this script)
from peft_jax import runtime  # noqa: E402

runtime.setup()

HEADING = "## ResNet-50 convolutions, JAX vs torch (`benchmarks/conv_profile.py`)"
PASSES = ("forward", "input grad", "kernel grad")


def resnet50_convolutions(batch: int) -> collections.Counter:
    """(input shape NHWC, kernel shape HWIO, stride, padding) -> occurrences in one ResNet-50 forward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from peft_jax.models import create_model, resnet

    found = collections.Counter()
    original = resnet.Conv.__call__

    def record(self, x):
        strides = self.strides if isinstance(self.strides, tuple) else (self.strides, self.strides)
        found[(tuple(x.shape), tuple(self.kernel.shape), strides[0], self.padding[0][0])] += 1
        return original(self, x)

    model = create_model("resnet50", num_classes=2, image_size=224, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    resnet.Conv.__call__ = record
    try:
        jax.eval_shape(lambda s: nnx.merge(graph, s)(jnp.zeros((batch, 224, 224, 3))), state)
    finally:
        resnet.Conv.__call__ = original
    return found


def jax_calls(x_shape, k_shape, stride, pad):
    """The three jitted passes of one convolution as peft_jax's ``resnet.Conv`` computes it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from peft_jax.models import resnet

    kh, _, cin, cout = k_shape
    layer = resnet.Conv(cin, cout, kernel_size=(kh, kh), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                        use_bias=False, rngs=nnx.Rngs(0))
    graph, state = nnx.split(layer)

    def conv(x, kernel):  # the layer's only parameter is its kernel
        return nnx.merge(graph, jax.tree.map(lambda _: kernel, state))(x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    y = jax.eval_shape(conv, x, w)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    kernel_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return [lambda: jax.block_until_ready(forward(x, w)), lambda: jax.block_until_ready(input_grad(x, w, g)),
            lambda: jax.block_until_ready(kernel_grad(x, w, g))]


def torch_calls(x_shape, k_shape, stride, pad):
    """The three calls autograd makes for one ``conv2d`` in channels-last (torch's fastest CPU layout)."""
    import torch

    n, h, w, cin = x_shape
    kh, kw, _, cout = k_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    k = torch.randn(cout, cin, kh, kw, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.nn.functional.conv2d(x, k, stride=stride, padding=pad)
    g = torch.randn(y.shape, generator=gen).contiguous(memory_format=torch.channels_last)

    def backward(mask):
        return torch.ops.aten.convolution_backward(g, x, k, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1,
                                                   mask)

    with torch.no_grad():
        return [lambda: torch.nn.functional.conv2d(x, k, stride=stride, padding=pad),
                lambda: backward([True, False, False]), lambda: backward([False, True, False])]


def flops(x_shape, k_shape, stride, pad) -> float:
    n, h, w, _ = x_shape
    kh, kw, cin, cout = k_shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    return 2.0 * n * ho * wo * kh * kw * cin * cout


def timed(call, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - start) / reps


def describe(key) -> str:
    x_shape, k_shape, stride, pad = key
    return f"{k_shape[0]}x{k_shape[1]} {k_shape[2]}->{k_shape[3]} @{x_shape[1]}px s{stride}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="calls per timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    convs = resnet50_convolutions(args.batch)
    calls = {}
    for key in convs:  # (the stem's input gradient is timed too, but left out of the table and its totals)
        calls[key] = {"jax": jax_calls(*key), "torch": torch_calls(*key)}
        for fn in calls[key]["jax"] + calls[key]["torch"]:
            fn()  # compile / warm up
    times = {(key, fw, p): [] for key in convs for fw in ("jax", "torch") for p in range(3)}
    for r in range(args.rounds):
        print(f"[conv_profile] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for key in convs:
            for p in range(3):
                for fw in ("jax", "torch"):  # interleaved: noise hits both alike
                    times[key, fw, p].append(timed(calls[key][fw][p], args.reps))
    median = {k: statistics.median(v) for k, v in times.items()}
    rows, totals = [], {(fw, p): 0.0 for fw in ("jax", "torch") for p in range(3)}
    for key, count in sorted(convs.items(), key=lambda kv: -kv[1] * median[kv[0], "jax", 2]):
        gflop = flops(*key) / 1e9
        cells = []
        for p in range(3):
            if p == 1 and key[0][-1] == 3:  # the stem: a train step never differentiates the images
                cells.append("not in a step")
                continue
            j, t = median[key, "jax", p], median[key, "torch", p]
            totals["jax", p] += count * j
            totals["torch", p] += count * t
            cells.append(f"{1e3 * j:.1f} / {1e3 * t:.1f} ({gflop / j:.0f} / {gflop / t:.0f})")
        rows.append(f"| {describe(key)} | {count} | {gflop:.2f} | " + " | ".join(cells) + " |")
    total_cells = [f"{1e3 * totals['jax', p]:.0f} / {1e3 * totals['torch', p]:.0f} "
                   f"({totals['jax', p] / totals['torch', p]:.2f}x)" for p in range(3)]
    jax_total, torch_total = (sum(totals[fw, p] for p in range(3)) for fw in ("jax", "torch"))
    rows.append("| **all convolutions of one step** (ms, JAX / torch time) | "
                f"{sum(convs.values())} | | " + " | ".join(total_cells) + " |")
    summary = (f"Sum over the three passes: JAX {1e3 * jax_total:.0f} ms, torch {1e3 * torch_total:.0f} ms "
               f"({jax_total / torch_total:.2f}x the time).")
    print("\n".join(rows) + "\n" + summary)
    section = "\n".join([
        HEADING, "",
        f"Command: `python benchmarks/conv_profile.py {' '.join(sys.argv[1:])}`".rstrip("` ") + "`  ",
        f"Date: {datetime.date.today()}; {os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}; "
        f"float32, batch {args.batch}, 224 px; medians over {args.rounds} interleaved rounds of {args.reps} calls. "
        "Each cell: ms per call JAX / torch (GFLOP/s JAX / torch); rows sorted by JAX time per step.", "",
        "| convolution | per step | GFLOP | " + " | ".join(PASSES) + " |",
        "|---|---:|---:|---:|---:|---:|", *rows, "", summary, ""])
    write_section(pathlib.Path(args.out), HEADING, section)


if __name__ == "__main__":
    main()
