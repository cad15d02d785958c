"""Sampling images from a Stable Diffusion pipeline folder, optionally with an adapter trained by
peft_jax/t2i/train.py (the run behind launch/generate.py).

``num_images`` images per prompt are written as ``<prompt>_<image>.png`` (``001_03.png``: the 4th image of
the 2nd prompt) with ``grid.png`` (a row per prompt) and ``prompts.json`` (file -> prompt). The adapter must
have been trained on this base (its recorded hash of the base U-Net must match) and its arrays must fit the
method of its adapter_config.json; it is merged into the U-Net before sampling. Image ``i`` of a run depends
on ``seed`` and ``batch_size``.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from PIL import Image

from peft_jax.adapters import apply_peft, merge, trainable_filter
from peft_jax.adapters.import_diffusers import apply_diffusers_lora, is_diffusers_lora
from peft_jax.adapters.io import load_adapter, read_adapter_config, state_hash
from peft_jax.checkpoints.diffusers import StableDiffusion, load_pipeline
from peft_jax.errors import UserError
from peft_jax.models.diffusion import schedulers
from peft_jax.t2i.data import encode_prompts


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The --prompt values, then the non-empty lines of --prompts_file."""
    prompts = list(prompts)
    if prompts_file and not pathlib.Path(prompts_file).is_file():
        raise UserError(f"--prompts_file {prompts_file}: no such file; give a text file with one prompt a line")
    if prompts_file:
        prompts += [line.strip() for line in pathlib.Path(prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt (repeatable) or --prompts_file")
    return prompts


def read_t2i_adapter_config(directory: str | pathlib.Path) -> dict:
    """adapter_config.json, refused early when it lacks what train_t2i writes (e.g. a classifier's adapter)."""
    meta = read_adapter_config(directory)
    if not {"peft", "model", "base_hash"} <= set(meta):
        raise UserError(f"{directory}: adapter_config.json lacks the peft method, model or base hash; is it a "
                         "train_t2i adapter folder?")
    return meta


def apply_adapter(pipe: StableDiffusion, directory: str | pathlib.Path) -> None:
    """Puts a train_t2i adapter on ``pipe.unet``: the method's surgery, a load checked against the base U-Net's
    hash and the method's variables, then a merge. A diffusers or kohya LoRA (folder or .safetensors) is merged too."""
    if is_diffusers_lora(directory):
        merge(pipe.unet, apply_diffusers_lora(pipe.unet, directory))
        return
    meta = read_t2i_adapter_config(directory)
    peft_cfg = ml_collections.ConfigDict(meta["peft"])
    base_hash = state_hash(nnx.state(pipe.unet, nnx.Param))
    apply_peft(pipe.unet, peft_cfg, rngs=nnx.Rngs(0))
    load_adapter(pipe.unet, directory, trainable_filter(peft_cfg), base_hash=base_hash)
    merge(pipe.unet, peft_cfg)


def vae_factor(pipe: StableDiffusion) -> int:
    """Pixels per latent along each side."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def sample_images(pipe: StableDiffusion, prompts: list[str], *, sampler: str, steps: int, guidance: float,
                  seed: int, batch_size: int, image_size: int) -> np.ndarray:
    """(len(prompts), size, size, 3) uint8 images, sampled in batches of ``batch_size`` (the last one padded)."""
    factor = vae_factor(pipe)
    if image_size % factor:
        raise UserError(f"image size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    shape = (batch_size, image_size // factor, image_size // factor, pipe.unet.config.in_channels)
    plan = schedulers.make_sampler(sampler, pipe.scheduler, steps)
    empty = encode_prompts(pipe, [""])
    uncond = jnp.broadcast_to(jnp.asarray(empty), (batch_size,) + empty.shape[1:])

    @nnx.jit
    def run(unet, vae, cond, key):
        latents = schedulers.sample(unet, plan, cond, uncond, shape=shape, key=key, guidance_scale=guidance)
        return vae.decode_latents(latents)

    images = []
    for b in tqdm.trange(0, len(prompts), batch_size, desc="sampling batches", disable=None):
        chunk = prompts[b:b + batch_size]
        cond = jnp.asarray(encode_prompts(pipe, chunk + [chunk[-1]] * (batch_size - len(chunk))))
        out = run(pipe.unet, pipe.vae, cond, jax.random.fold_in(jax.random.key(seed), b // batch_size))
        images.append(np.asarray(out)[:len(chunk)])
    return ((np.clip(np.concatenate(images), -1, 1) + 1) * 127.5).round().astype(np.uint8)


def save_images(images: np.ndarray, prompts: list[str], num_images: int, out: str | pathlib.Path) -> list[pathlib.Path]:
    """One PNG per image, ``grid.png`` (a row per prompt) and ``prompts.json``; returns the PNG paths, grid last."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, names = [], {}
    for i, image in enumerate(images):
        path = out / f"{i // num_images:03d}_{i % num_images:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
        names[path.name] = prompts[i // num_images]
    n, h, w, c = images.shape
    grid = images.reshape(n // num_images, num_images, h, w, c).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(n // num_images * h, num_images * w, c)).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(names, indent=1))
    return paths + [out / "grid.png"]


def generate(base: str | pathlib.Path, prompts: list[str], out: str | pathlib.Path, *,
             adapter: str | pathlib.Path | None = None, num_images: int = 1, sampler: str = "ddim", steps: int = 50,
             guidance: float = 7.5, seed: int = 0, batch_size: int = 4, image_size: int = 0) -> list[pathlib.Path]:
    """Samples ``num_images`` per prompt with the base pipeline (and adapter) and saves them; returns the paths."""
    if num_images < 1 or batch_size < 1:
        raise UserError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}")
    meta = read_t2i_adapter_config(adapter) if adapter and not is_diffusers_lora(adapter) else {}
    pipe = load_pipeline(base, dtype=meta["model"].get("dtype") if meta else None)
    if adapter:
        apply_adapter(pipe, adapter)
    if not image_size:
        image_size = meta["model"]["image_size"] if meta else pipe.unet.config.sample_size * vae_factor(pipe)
    every = [p for p in prompts for _ in range(num_images)]
    images = sample_images(pipe, every, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                           batch_size=batch_size, image_size=image_size)
    return save_images(images, prompts, num_images, out)
