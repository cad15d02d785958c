"""Text-to-image PEFT of Stable Diffusion: the U-Net learns, the VAE and text encoder stay frozen.

    python launch/train_t2i.py --config configs/sd15_norm_bias.py \
        --config.init.checkpoint=/models/stable-diffusion-v1-5 \
        --config.dataset.manual_dir=$PEFT_JAX_DATA/chest_xray/train --workdir runs/sd15_norm_bias

The image folder has one subfolder per label; each image's prompt is
``dataset.prompt_template`` with the lower-cased folder name (``a chest x-ray showing pneumonia``).
Latents and text embeddings are computed once and cached in memory. The workdir receives
``results.json`` (counts and the loss curve), ``adapter/adapter.safetensors`` +
``adapter_config.json`` (the trainable state only) and, with ``sample.num_images``, a PNG grid.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from peft_jax.adapters import apply_peft, param_report, trainable_filter  # noqa: E402
from peft_jax.checkpoints.diffusers import StableDiffusion, load_pipeline  # noqa: E402
from peft_jax.models.diffusion import schedulers  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_folder(root: str | pathlib.Path, size: int, max_images: int = 0) -> tuple[np.ndarray, list[str]]:
    """(N, size, size, 3) images in [-1, 1] and their labels (the subfolder names, lower-cased), sorted."""
    root = pathlib.Path(root)
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: expected one subfolder per label holding {'/'.join(IMAGE_SUFFIXES)} images")
    if max_images:
        rng = np.random.default_rng(0)
        files = [files[i] for i in sorted(rng.permutation(len(files))[:max_images])]
    images = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC), np.float32) for p in files]
    return np.stack(images) / 127.5 - 1.0, [p.parent.name.lower() for p in files]


def encode_prompts(pipe: StableDiffusion, prompts: list[str]) -> np.ndarray:
    ids = pipe.tokenizer(prompts)
    run = nnx.jit(lambda m, x: m(x))
    return np.concatenate([np.asarray(run(pipe.text_encoder, jnp.asarray(ids[i:i + 16])))
                           for i in range(0, len(ids), 16)])


def encode_images(pipe: StableDiffusion, images: np.ndarray) -> np.ndarray:
    """Posterior-mean latents, scaled for the U-Net (cached once: the VAE is frozen)."""
    run = nnx.jit(lambda m, x: m.latents(x))
    return np.concatenate([np.asarray(run(pipe.vae, jnp.asarray(images[i:i + 8]))) for i in range(0, len(images), 8)])


def make_train_step(graph, sched: schedulers.SchedulerConfig, tx: optax.GradientTransformation):
    """A jitted step over (trainable, frozen, opt_state); only the trainable state is differentiated."""

    def loss_fn(trainable, frozen, latents, context, key):
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_n, latents.shape)
        pred = nnx.merge(graph, trainable, frozen)(schedulers.add_noise(sched, latents, noise, t), t, context)
        return jnp.mean((pred - schedulers.training_target(sched, latents, noise, t)) ** 2)

    @jax.jit
    def step(trainable, frozen, opt_state, latents, context, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, latents, context, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Fine-tunes the U-Net of ``init.checkpoint`` with ``peft.method``; returns (and writes) results.json."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not cfg.init.checkpoint:
        raise ValueError("init.checkpoint: set it to a diffusers Stable Diffusion pipeline folder")
    pipe = load_pipeline(cfg.init.checkpoint, dtype=cfg.model.dtype)
    images, labels = image_folder(cfg.dataset.manual_dir, cfg.model.image_size, cfg.dataset.max_images)
    prompts = [cfg.dataset.prompt_template.format(label=label) for label in labels]
    latents, context = encode_images(pipe, images), encode_prompts(pipe, prompts)

    unet = apply_peft(pipe.unet, cfg.peft, rngs=nnx.Rngs(cfg.seed))
    unet.train()
    filt = trainable_filter(cfg.peft)
    report = param_report(unet, filt)
    graph, trainable, frozen = nnx.split(unet, filt, ...)
    tx = optax.adamw(cfg.train.lr, weight_decay=cfg.train.weight_decay)
    opt_state = tx.init(trainable)
    step = make_train_step(graph, pipe.scheduler, tx)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    losses, start = [], time.time()
    for i in range(cfg.train.num_steps):
        idx = rng.choice(len(latents), size=min(cfg.train.batch_size, len(latents)), replace=False)
        key, sub = jax.random.split(key)
        trainable, opt_state, loss = step(trainable, frozen, opt_state, latents[idx], context[idx], sub)
        losses.append(float(loss))
        if cfg.train.log_every and (i + 1) % cfg.train.log_every == 0:
            print(f"step {i + 1}: loss {np.mean(losses[-cfg.train.log_every:]):.4f}", flush=True)
    nnx.update(unet, trainable)
    unet.eval()
    save_adapter(workdir / "adapter", trainable, cfg)
    results = {"method": cfg.peft.method, "model": cfg.model.name, "dataset": str(cfg.dataset.manual_dir),
               "seed": cfg.seed, "trainable_params": report["trainable_params"],
               "total_params": report["total_params"], "trainable_percent": report["trainable_percent"],
               "num_images": len(latents), "losses": losses, "train_seconds": time.time() - start}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def save_adapter(folder: pathlib.Path, trainable: nnx.State, cfg: ml_collections.ConfigDict) -> None:
    """The trainable state only, as safetensors with '/'-joined variable paths, and the method's settings."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainable)}
    save_file(flat, str(folder / "adapter.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft": cfg.peft.to_dict(), "model": cfg.model.name,
                                                            "base": str(cfg.init.checkpoint)}, indent=1))


def main(argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    del argv
    cfg = config_flags.DEFINE_config_file("config", None, "configs/sd15_<method>.py", lock_config=True)
    workdir = flags.DEFINE_string("workdir", "runs/t2i", "Output folder.")
    flags.FLAGS(sys.argv)
    results = train(cfg.value, workdir.value)
    print(json.dumps({k: v for k, v in results.items() if k != "losses"}))


if __name__ == "__main__":
    main(sys.argv)
