"""Training examples for text-to-image PEFT, and their encoding by the frozen VAE and text encoder.

``dataset.name``:
  ``image_folder``: one subfolder per label in ``dataset.manual_dir``; the prompt is ``dataset.prompt_template``
  with the lower-cased folder name (``a chest x-ray showing pneumonia``).
  ``iu_xray`` / ``mimic_cxr``: the TFDS datasets of launch/prepare_data.py (prepared on first use from
  ``dataset.manual_dir``); the prompt is the report's ``dataset.prompt_field`` (``impression``, ``findings``
  or ``both``) with its whitespace collapsed; images without that text are left out. The tokenizer
  truncates prompts to CLIP's 77 tokens.
Latents and text embeddings are computed once and cached in memory (one embedding per distinct prompt).
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from peft_jax.checkpoints.diffusers import StableDiffusion
from peft_jax.data.images import IMAGE_SUFFIXES, read_rgb, signed_unit
from peft_jax.errors import UserError

REPORT_DATASETS = ("iu_xray", "mimic_cxr")
PROMPT_FIELDS = ("impression", "findings", "both")
IMAGE_CHUNK, TEXT_CHUNK = 8, 16  # fixed encoder batch sizes (the last chunk is padded): one compilation each


@dataclasses.dataclass
class Examples:
    """A dataset read one example at a time: ``read(i)`` is a (size, size, 3) image in [-1, 1] and its prompt."""

    count: int
    read: Callable[[int], tuple[np.ndarray, str]]


def load_image(source: str | pathlib.Path | io.BytesIO, size: int) -> np.ndarray:
    """An 8-bit image resized (bicubic) to (size, size, 3) in [-1, 1], the VAE's range."""
    return signed_unit(read_rgb(source, size))


def image_folder(root: str | pathlib.Path, size: int, template: str) -> Examples:
    """Images in one subfolder per label (sorted); the prompt is ``template`` with the lower-cased label."""
    if not root:
        raise UserError("dataset.manual_dir: set it to the image folder (one subfolder per label) for "
                        "dataset.name=image_folder")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.manual_dir={root}: no such folder; give the image folder (one subfolder "
                                "per label)")
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: expected one subfolder per label holding {'/'.join(IMAGE_SUFFIXES)} images")
    return Examples(len(files), lambda i: (load_image(files[i], size),
                                           template.format(label=files[i].parent.name.lower())))


def report_prompt(record: dict, field: str) -> str:
    """The report's ``field`` ("both": findings then impression) with its whitespace collapsed."""
    texts = [record[f].decode() if isinstance(record[f], bytes) else record[f]
             for f in (("findings", "impression") if field == "both" else (field,))]
    return " ".join(" ".join(texts).split())


def report_dataset(ds: ml_collections.ConfigDict, size: int) -> Examples:
    """A split of iu_xray or mimic_cxr (prepared on first use), prompted by its reports."""
    import tensorflow_datasets as tfds

    from peft_jax.data import tfds_loader

    if ds.prompt_field not in PROMPT_FIELDS:  # before any preparation
        raise UserError(f"dataset.prompt_field must be one of {PROMPT_FIELDS}, got {ds.prompt_field!r}")
    builder = tfds_loader.prepare(ds.name, manual_dir=ds.manual_dir or None, data_dir=ds.data_dir, config=ds.config,
                                  skip_bad_files=ds.skip_bad_files)
    source = builder.as_data_source(split=ds.split, decoders={"image": tfds.decode.SkipDecoding()})

    def read(i: int) -> tuple[np.ndarray, str]:
        record = source[i]
        return load_image(io.BytesIO(record["image"]), size), report_prompt(record, ds.prompt_field)

    return Examples(len(source), read)


def load_examples(ds: ml_collections.ConfigDict, size: int) -> Examples:
    if ds.name == "image_folder":
        return image_folder(ds.manual_dir, size, ds.prompt_template)
    if ds.name in REPORT_DATASETS:
        return report_dataset(ds, size)
    raise UserError(f"dataset.name must be image_folder or one of {REPORT_DATASETS}, got {ds.name!r}")


_encode_text = nnx.jit(lambda encoder, ids: encoder(ids))
_encode_images = nnx.jit(lambda vae, images: vae.latents(images))


def _padded(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x


def encode_prompts(pipe: StableDiffusion, prompts: list[str]) -> np.ndarray:
    """CLIP text embeddings (N, 77, D) of the prompts, truncated to 77 tokens."""
    ids = pipe.tokenizer(prompts)
    out = []
    for i in range(0, len(ids), TEXT_CHUNK):
        chunk = ids[i:i + TEXT_CHUNK]
        out.append(np.asarray(_encode_text(pipe.text_encoder, jnp.asarray(_padded(chunk, TEXT_CHUNK))))[:len(chunk)])
    return np.concatenate(out)


@dataclasses.dataclass
class Cache:
    """Posterior-mean latents of the training images (scaled for the U-Net) and one text embedding per prompt."""

    latents: np.ndarray  # (N, h, w, 4)
    prompt_ids: np.ndarray  # (N,): the row of each image's prompt in prompts / embeddings
    prompts: list[str]
    embeddings: np.ndarray  # (P, 77, D)


def cache_examples(pipe: StableDiffusion, examples: Examples, max_images: int = 0) -> Cache:
    """Encodes every example once (the VAE and text encoder are frozen); ``max_images`` keeps a random subset."""
    indices = np.arange(examples.count)
    if max_images and max_images < examples.count:
        indices = np.sort(np.random.default_rng(0).permutation(examples.count)[:max_images])
    latents, prompts = [], []
    for start in tqdm.trange(0, len(indices), IMAGE_CHUNK, desc="encoding images", disable=None):
        pairs = map(examples.read, indices[start:start + IMAGE_CHUNK].tolist())
        kept = [(image, prompt) for image, prompt in pairs if prompt]
        if kept:
            images = jnp.asarray(_padded(np.stack([image for image, _ in kept]), IMAGE_CHUNK))
            latents.append(np.asarray(_encode_images(pipe.vae, images))[:len(kept)])
            prompts.extend(prompt for _, prompt in kept)
    if not prompts:
        raise UserError(f"none of the {len(indices)} examples has prompt text")
    if len(prompts) < len(indices):
        print(f"[data] {len(indices) - len(prompts)} of {len(indices)} examples have no prompt text: left out")
    unique, prompt_ids = np.unique(np.asarray(prompts), return_inverse=True)
    return Cache(np.concatenate(latents), prompt_ids, unique.tolist(), encode_prompts(pipe, unique.tolist()))
