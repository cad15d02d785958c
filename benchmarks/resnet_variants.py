"""Where a ResNet-50 train step spends its time on XLA:CPU: convolution strategies and BatchNorm.

    python benchmarks/resnet_variants.py [--rounds 5] [--batch 8]

One process, every variant compiled first, then timed interleaved (medians over rounds), full
fine-tuning with AdamW at 224 px. Variants:
- ``xla_conv``: every convolution through XLA's convolution (peft_jax before 1x1s became products);
- ``pointwise_autodiff``: unpadded 1x1 convolutions as products, differentiated by plain autodiff;
- ``pointwise``: what peft_jax runs (``models.resnet.Conv``: the same products, whose kernel gradient
  reads its input through an optimization barrier, ``resnet.channel_product``);
- ``pointwise_im2col``: also the 3x3 convolutions as one product over gathered patches (im2col);
- ``pointwise_eval_bn``: ``pointwise`` with BatchNorm on running statistics, which prices the batch
  statistics that training computes.
Writes its section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
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

HEADING = "## ResNet-50 step variants on XLA:CPU (`benchmarks/resnet_variants.py`)"
VARIANTS = ("xla_conv", "pointwise_autodiff", "pointwise", "pointwise_im2col", "pointwise_eval_bn")


def im2col_call(self, x):
    """A kxk convolution with explicit padding as one product over the gathered patches."""
    import jax.numpy as jnp

    kernel = self.kernel[...]
    kh, kw, cin, cout = kernel.shape
    if kh == 1:
        return ORIGINAL_CALL(self, x)
    (pt, pb), (pl, pr) = self.padding
    s = self.strides[0]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    h = (x.shape[1] + pt + pb - kh) // s + 1
    w = (x.shape[2] + pl + pr - kw) // s + 1
    cols = [xp[:, dy:dy + s * (h - 1) + 1:s, dx:dx + s * (w - 1) + 1:s, :] for dy in range(kh) for dx in range(kw)]
    return jnp.concatenate(cols, axis=-1) @ kernel.reshape(kh * kw * cin, cout).astype(x.dtype)


ORIGINAL_CALL = None


def compiled_step(variant: str, batch: int):
    """(step, args) for one variant; the variant's convolution is chosen while the step is traced."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from peft_jax.models import create_model
    from peft_jax.models import resnet

    model = create_model("resnet50", num_classes=2, image_size=224, rngs=nnx.Rngs(0))
    model.train()
    if variant == "pointwise_eval_bn":
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.BatchNorm):
                m.use_running_average = True
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32))
    y = jax.numpy.asarray(rng.integers(0, 2, batch))

    @jax.jit
    def step(params, rest, opt):
        def loss_fn(p):
            m = nnx.merge(graph, p, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), rest, opt, loss

    calls = {"xla_conv": nnx.Conv.__call__, "pointwise_im2col": im2col_call}
    resnet.Conv.__call__ = calls.get(variant, ORIGINAL_CALL)
    product = resnet.channel_product
    if variant == "pointwise_autodiff":
        resnet.channel_product = jax.numpy.matmul
    try:
        args = (params, rest, tx.init(params))
        jax.block_until_ready(step(*args))  # trace and compile with this variant
    finally:
        resnet.Conv.__call__ = ORIGINAL_CALL
        resnet.channel_product = product
    return step, args


def main() -> None:
    global ORIGINAL_CALL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    import jax

    from peft_jax.models import resnet

    ORIGINAL_CALL = resnet.Conv.__call__
    steps = {}
    for variant in VARIANTS:
        print(f"[resnet_variants] compiling {variant} ...", file=sys.stderr, flush=True)
        steps[variant] = compiled_step(variant, args.batch)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant, (step, step_args) in steps.items():  # interleaved: noise hits every variant alike
            t = time.perf_counter()
            jax.block_until_ready(step(*step_args))
            times[variant].append(time.perf_counter() - t)
    median = {v: statistics.median(t) for v, t in times.items()}
    rows = [f"| `{v}` | {args.batch / median[v]:.2f} | {median[v] / median['pointwise']:.2f} |" for v in VARIANTS]
    print("\n".join(rows))
    section = "\n".join([
        HEADING, "",
        f"Command: `python benchmarks/resnet_variants.py {' '.join(sys.argv[1:])}`".rstrip("` ") + "`  ",
        f"Date: {datetime.date.today()}; {os.cpu_count()} CPU cores; jax {jax.__version__}; ResNet-50 full "
        f"fine-tuning, AdamW, batch {args.batch}, 224 px; medians over {args.rounds} interleaved rounds.", "",
        "| variant | img/s | step time / `pointwise` |", "|---|---:|---:|", *rows, ""])
    write_section(pathlib.Path(args.out), HEADING, section)


if __name__ == "__main__":
    main()
