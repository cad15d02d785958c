#!/usr/bin/env bash
# One-shot GPU check (H200): an SD 1.5-sized U-Net (random weights), 512 px (64x64 latents), bf16 compute,
# LoRA (r=4, attention projections) and bias tuning; prints images/s and peak memory per method as JSON lines.
# Usage: bash benchmarks/gpu_check_sd.sh [batch_size]   (needs jax[cuda]; about 3-5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${1:-8}" python - <<'PY'
import json, os, time
import jax, jax.numpy as jnp, ml_collections, optax
from flax import nnx
from peft_jax.adapters import apply_peft, param_report, trainable_filter
from peft_jax.models.diffusion import UNet2DConditionModel, UNetConfig
from peft_jax.models.diffusion import schedulers

batch = int(os.environ["BATCH"])
sched = schedulers.SchedulerConfig()
print(json.dumps({"devices": [str(d) for d in jax.devices()]}))
for method, targets in (("lora", r"attn[12]/(to_q|to_k|to_v|to_out)$"), ("bias", None)):
    cfg = ml_collections.ConfigDict(dict(method=method, rank=4, alpha=4.0, targets=targets))
    unet = apply_peft(UNet2DConditionModel(UNetConfig(dtype="bfloat16"), rngs=nnx.Rngs(0)), cfg)
    filt = trainable_filter(cfg)
    report = param_report(unet, filt)
    graph, trainable, frozen = nnx.split(unet, filt, ...)
    tx = optax.adamw(1e-4)
    opt = tx.init(trainable)

    def loss_fn(tr, fr, x0, ctx, key):
        kt, kn = jax.random.split(key)
        t = jax.random.randint(kt, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(kn, x0.shape)
        pred = nnx.merge(graph, tr, fr)(schedulers.add_noise(sched, x0, noise, t), t, ctx)
        return jnp.mean((pred - noise) ** 2)

    @jax.jit
    def step(tr, fr, opt, x0, ctx, key):
        loss, g = jax.value_and_grad(loss_fn)(tr, fr, x0, ctx, key)
        up, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, up), opt, loss

    x0 = jax.random.normal(jax.random.key(1), (batch, 64, 64, 4))
    ctx = jax.random.normal(jax.random.key(2), (batch, 77, 768))
    key = jax.random.key(3)
    t0 = time.time()
    trainable, opt, loss = step(trainable, frozen, opt, x0, ctx, key); loss.block_until_ready()
    compile_s = time.time() - t0
    n = 10
    t0 = time.time()
    for i in range(n):
        trainable, opt, loss = step(trainable, frozen, opt, x0, ctx, jax.random.fold_in(key, i))
    loss.block_until_ready()
    dt = (time.time() - t0) / n
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps({"method": method, "batch": batch, "trainable_params": report["trainable_params"],
                      "compile_s": round(compile_s, 1), "step_s": round(dt, 4),
                      "images_per_s": round(batch / dt, 2), "loss": float(loss),
                      "peak_bytes": stats.get("peak_bytes_in_use")}), flush=True)
    del unet, trainable, frozen, opt
PY
