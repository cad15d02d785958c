"""Text-to-image PEFT of Stable Diffusion: the U-Net learns, the VAE and text encoder stay frozen.

The step is jitted over the (data, fsdp) mesh of ``mesh.*`` with the shardings of the run's
``TrainState``: the batch is split over the devices, trainable and frozen weights follow
peft_jax/sharding.py's rules. Every ``train.checkpoint_every`` steps and at the end, ``checkpoints/latest``
receives the trainable state, the optimizer state, the random key, the step and the losses so far;
rerunning the same command continues from there with the same batches and noise. The workdir also
receives ``results.json`` (counts and the loss curve) and ``adapter/`` (``adapter.safetensors`` +
``adapter_config.json``: the trainable state, the method, a hash of the base U-Net; for ``lora`` also
``adapter/diffusers/pytorch_lora_weights.safetensors``).
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from peft_jax import sharding as shd
from peft_jax.adapters import apply_peft, method_names, param_report, trainable_filter
from peft_jax.adapters.export_diffusers import export_lora_diffusers
from peft_jax.adapters.io import save_adapter, state_hash
from peft_jax.checkpoints.diffusers import load_pipeline
from peft_jax.errors import UserError
from peft_jax.models.diffusion import schedulers
from peft_jax.t2i.data import Cache, cache_examples, load_examples
from peft_jax.train.state import TrainState, setup
from peft_jax.train.workdir import Workdir, sigterm_flag


def make_train_step(state: TrainState, sched: schedulers.SchedulerConfig) -> Callable:
    """step(trainable, frozen, rest, opt_state, rng, batch) -> (trainable, opt_state, rng, loss), jitted with the
    state's shardings and donated state; only the trainable state is differentiated."""
    graph, tx = state.graph_train, state.tx

    def loss_fn(trainable, frozen, rest, latents, context, key):
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_n, latents.shape)
        pred = nnx.merge(graph, trainable, frozen, rest)(schedulers.add_noise(sched, latents, noise, t), t, context)
        return jnp.mean((pred.astype(jnp.float32) - schedulers.training_target(sched, latents, noise, t)) ** 2)

    def step(trainable, frozen, rest, opt_state, rng, batch):
        key, sub = jax.random.split(jax.random.wrap_key_data(rng))
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, rest, batch["latents"], batch["context"], sub)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, jax.random.key_data(key), loss

    sh, rng = state.shardings, NamedSharding(state.mesh, PartitionSpec())
    batch = {"latents": state.batch_sharding, "context": state.batch_sharding}
    return jax.jit(step, in_shardings=(sh["trainable"], sh["frozen"], sh["rest"], sh["opt_state"], rng, batch),
                   out_shardings=(sh["trainable"], sh["opt_state"], rng, rng), donate_argnums=(0, 3, 4))


def check_config(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    if not cfg.init.checkpoint:
        raise UserError("init.checkpoint: set it to a diffusers Stable Diffusion pipeline folder")
    if cfg.train.batch_size % num_devices:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {num_devices} devices of "
                         "the mesh (mesh.data x mesh.fsdp)")


def fit(cfg: ml_collections.ConfigDict, workdir: Workdir, state: TrainState, step_fn: Callable, cache: Cache) -> list:
    """Trains from the latest checkpoint (if any) to ``train.num_steps``; returns the losses of every step."""
    rng = jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), NamedSharding(state.mesh, PartitionSpec()))
    saved = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": rng}
    meta = {"step": 0, "losses": []}
    if workdir.latest_step("latest") is not None:
        restored, meta = workdir.restore("latest", saved)
        rng = jax.device_put(restored.pop("rng"), rng.sharding)
        state.load(restored)
        print(f"[resume] {workdir.path}: continuing from step {meta['step']}")
    # The batch of step k is a pure function of (seed, k): a shuffled order of the images, reshuffled every epoch.
    order = grain.MapDataset.range(len(cache.latents)).shuffle(seed=cfg.seed).repeat().batch(
        cfg.train.batch_size, drop_remainder=True)
    losses, every = list(meta["losses"]), cfg.train.checkpoint_every
    with sigterm_flag() as stop:
        for step in range(int(meta["step"]), cfg.train.num_steps):
            idx = np.asarray(order[step])
            batch = {"latents": cache.latents[idx], "context": cache.embeddings[cache.prompt_ids[idx]]}
            state.trainable, state.opt_state, rng, loss = step_fn(
                state.trainable, state.frozen, state.rest, state.opt_state, rng, batch)
            losses.append(float(loss))
            done = step + 1
            if cfg.train.log_every and done % cfg.train.log_every == 0:
                print(f"step {done}: loss {np.mean(losses[-cfg.train.log_every:]):.4f}", flush=True)
            if (every and done % every == 0) or done == cfg.train.num_steps or stop["signal"]:
                workdir.save("latest", done, {"trainable": state.trainable, "opt_state": state.opt_state, "rng": rng},
                             {"step": done, "losses": losses})
            if stop["signal"]:
                raise workdir.preempted(done)
    return losses


def train(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Fine-tunes the U-Net of ``init.checkpoint`` with ``peft.method`` (continuing from the workdir's latest
    checkpoint if there is one); returns (and writes) results.json."""
    workdir = Workdir(workdir)
    mesh = shd.make_mesh(cfg.mesh)
    check_config(cfg, mesh.size)
    workdir.refuse_other_experiment(cfg)
    examples = load_examples(cfg.dataset, cfg.model.image_size)  # a missing data folder fails before the pipeline loads
    pipe = load_pipeline(cfg.init.checkpoint, dtype=cfg.model.dtype)
    cache = cache_examples(pipe, examples, cfg.dataset.max_images)
    base_hash = state_hash(nnx.state(pipe.unet, nnx.Param))
    unet = apply_peft(pipe.unet, cfg.peft, rngs=nnx.Rngs(cfg.seed))
    filt = trainable_filter(cfg.peft)
    report = param_report(unet, filt)
    workdir.record_config(cfg)  # only now: a run that could not start leaves nothing behind
    state = setup(cfg, unet, filt, mesh)
    start = time.time()
    losses = fit(cfg, workdir, state, make_train_step(state, pipe.scheduler), cache)

    nnx.update(unet, state.trainable)
    unet.eval()
    adapter = workdir.path / "adapter"
    save_adapter(adapter, unet, filt, config=cfg, base_hash=base_hash,
                 extra={"base": str(cfg.init.checkpoint), "dataset": cfg.dataset.name})
    if method_names(cfg.peft) == ["lora"]:
        export_lora_diffusers(unet, cfg.peft, adapter / "diffusers")
    results = {"method": cfg.peft.method, "model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
               "trainable_params": report["trainable_params"], "total_params": report["total_params"],
               "trainable_percent": report["trainable_percent"], "num_images": len(cache.latents),
               "num_prompts": len(cache.prompts), "num_devices": mesh.size, "steps_run": len(losses),
               "losses": losses, "train_seconds_this_run": time.time() - start}
    workdir.write_json("results.json", results, indent=1)
    return results
