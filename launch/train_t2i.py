"""Text-to-image PEFT of Stable Diffusion: the U-Net learns, the VAE and text encoder stay frozen.

    python launch/train_t2i.py --config configs/sd15_lora.py \
        --config.init.checkpoint=/models/stable-diffusion-v1-5 \
        --config.dataset.name=iu_xray --config.dataset.prompt_field=impression --workdir runs/sd15_lora_iu

Data (``dataset.name``):
  ``image_folder``: one subfolder per label in ``dataset.manual_dir``; the prompt is ``dataset.prompt_template``
  with the lower-cased folder name (``a chest x-ray showing pneumonia``).
  ``iu_xray`` / ``mimic_cxr``: the TFDS datasets of launch/prepare_data.py (prepared on first use from
  ``dataset.manual_dir``); the prompt is the report's ``dataset.prompt_field`` (``impression``, ``findings``
  or ``both``) with its whitespace collapsed; images without that text are left out. The tokenizer
  truncates prompts to CLIP's 77 tokens.
Latents and text embeddings are computed once and cached in memory (one embedding per distinct prompt).

The step is jitted over the (data, fsdp) mesh of ``mesh.*`` with explicit shardings: the batch is split
over the devices, trainable and frozen weights follow peft_jax/sharding.py's rules. Every
``train.checkpoint_every`` steps and at the end, ``checkpoints/latest`` (orbax) receives the trainable state,
the optimizer state, the random key, the step and the losses so far; rerunning the same command continues
from there with the same batches and noise. The workdir also receives ``results.json`` (counts and the loss
curve) and ``adapter/`` (``adapter.safetensors`` + ``adapter_config.json``: the trainable state, the method,
a hash of the base U-Net; for ``lora`` also ``adapter/diffusers/pytorch_lora_weights.safetensors``).
Sample images with launch/generate.py.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from peft_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.setup()  # re-executes with tcmalloc preloaded, before jax is imported

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tqdm  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from PIL import Image  # noqa: E402

from peft_jax import sharding as shd  # noqa: E402
from peft_jax.adapters import apply_peft, method_names, param_report, trainable_filter  # noqa: E402
from peft_jax.adapters.export_diffusers import export_lora_diffusers  # noqa: E402
from peft_jax.adapters.io import save_adapter, state_hash  # noqa: E402
from peft_jax.checkpoints.diffusers import StableDiffusion, load_pipeline  # noqa: E402
from peft_jax.data.images import require_8bit  # noqa: E402
from peft_jax.metrics.inception import IMAGE_SUFFIXES  # noqa: E402
from peft_jax.models.diffusion import schedulers  # noqa: E402
from peft_jax.train import loop, optim  # noqa: E402

REPORT_DATASETS = ("iu_xray", "mimic_cxr")
PROMPT_FIELDS = ("impression", "findings", "both")
IMAGE_CHUNK, TEXT_CHUNK = 8, 16  # fixed encoder batch sizes (the last chunk is padded): one compilation each


@dataclasses.dataclass
class Examples:
    """A dataset read one example at a time: ``read(i)`` is a (size, size, 3) image in [-1, 1] and its prompt."""

    count: int
    read: Callable[[int], tuple[np.ndarray, str]]


def load_image(source: str | pathlib.Path | io.BytesIO, size: int) -> np.ndarray:
    with Image.open(source) as image:
        require_8bit(image, source)
        rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def image_folder(root: str | pathlib.Path, size: int, template: str) -> Examples:
    """Images in one subfolder per label (sorted); the prompt is ``template`` with the lower-cased label."""
    root = pathlib.Path(root)
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
        raise ValueError(f"dataset.prompt_field must be one of {PROMPT_FIELDS}, got {ds.prompt_field!r}")
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
    raise ValueError(f"dataset.name must be image_folder or one of {REPORT_DATASETS}, got {ds.name!r}")


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
        raise ValueError(f"none of the {len(indices)} examples has prompt text")
    if len(prompts) < len(indices):
        print(f"[data] {len(indices) - len(prompts)} of {len(indices)} examples have no prompt text: left out")
    unique, prompt_ids = np.unique(np.asarray(prompts), return_inverse=True)
    return Cache(np.concatenate(latents), prompt_ids, unique.tolist(), encode_prompts(pipe, unique.tolist()))


def make_train_step(graph: nnx.GraphDef, sched: schedulers.SchedulerConfig, tx: optax.GradientTransformation,
                    shardings: dict, batch_sharding: NamedSharding) -> Callable:
    """step(trainable, frozen, opt_state, rng, batch) -> (trainable, opt_state, rng, loss), jitted with explicit
    shardings and donated state; only the trainable state is differentiated."""

    def loss_fn(trainable, frozen, latents, context, key):
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_n, latents.shape)
        pred = nnx.merge(graph, trainable, frozen)(schedulers.add_noise(sched, latents, noise, t), t, context)
        return jnp.mean((pred.astype(jnp.float32) - schedulers.training_target(sched, latents, noise, t)) ** 2)

    def step(trainable, frozen, opt_state, rng, batch):
        key, sub = jax.random.split(jax.random.wrap_key_data(rng))
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch["latents"], batch["context"], sub)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, jax.random.key_data(key), loss

    sh = shardings
    batch = {"latents": batch_sharding, "context": batch_sharding}
    return jax.jit(step, in_shardings=(sh["trainable"], sh["frozen"], sh["opt_state"], sh["rng"], batch),
                   out_shardings=(sh["trainable"], sh["opt_state"], sh["rng"], sh["rng"]), donate_argnums=(0, 2, 3))


def train(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Fine-tunes the U-Net of ``init.checkpoint`` with ``peft.method`` (continuing from the workdir's latest
    checkpoint if there is one); returns (and writes) results.json."""
    workdir = pathlib.Path(workdir)
    if not cfg.init.checkpoint:
        raise ValueError("init.checkpoint: set it to a diffusers Stable Diffusion pipeline folder")
    mesh = shd.make_mesh(cfg.mesh)
    if cfg.train.batch_size % mesh.size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {mesh.size} devices of "
                         "the mesh (mesh.data x mesh.fsdp)")
    loop.check_workdir(cfg, workdir)
    pipe = load_pipeline(cfg.init.checkpoint, dtype=cfg.model.dtype)
    cache = cache_examples(pipe, load_examples(cfg.dataset, cfg.model.image_size), cfg.dataset.max_images)
    base_hash = state_hash(nnx.state(pipe.unet, nnx.Param))
    unet = apply_peft(pipe.unet, cfg.peft, rngs=nnx.Rngs(cfg.seed))
    unet.train()
    filt = trainable_filter(cfg.peft)
    report = param_report(unet, filt)
    loop.record_config(cfg, workdir)  # only now: a run that could not start leaves nothing behind

    graph, trainable, frozen = nnx.split(unet, filt, ...)
    tx = optax.adamw(cfg.train.lr, weight_decay=cfg.train.weight_decay, mask=optim.decay_mask)
    size = cfg.mesh.min_shard_size
    sh = {"trainable": shd.tree_shardings(trainable, mesh, size), "frozen": shd.tree_shardings(frozen, mesh, size),
          "opt_state": shd.tree_shardings(jax.eval_shape(tx.init, trainable), mesh, size),
          "rng": NamedSharding(mesh, PartitionSpec())}
    step_fn = make_train_step(graph, pipe.scheduler, tx, sh, shd.batch_sharding(mesh))
    frozen = jax.device_put(frozen, sh["frozen"])
    state = {"trainable": jax.device_put(trainable, sh["trainable"]),
             "rng": jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), sh["rng"])}
    state["opt_state"] = jax.jit(tx.init, out_shardings=sh["opt_state"])(state["trainable"])
    manager = loop.checkpoint_manager(workdir / "checkpoints" / "latest")
    meta = {"step": 0, "losses": []}
    if manager.latest_step() is not None:
        restored, meta = loop.Checkpoints.restore(manager, state)
        state = {k: jax.device_put(v, sh[k]) for k, v in restored.items()}
        print(f"[resume] {workdir}: continuing from step {meta['step']}")

    # The batch of step k is a pure function of (seed, k): a shuffled order of the images, reshuffled every epoch.
    order = grain.MapDataset.range(len(cache.latents)).shuffle(seed=cfg.seed).repeat().batch(
        cfg.train.batch_size, drop_remainder=True)
    losses, every = list(meta["losses"]), cfg.train.checkpoint_every
    start = time.time()
    stop, restore_sigterm = loop.catch_sigterm()
    try:
        for step in range(int(meta["step"]), cfg.train.num_steps):
            idx = np.asarray(order[step])
            batch = {"latents": cache.latents[idx], "context": cache.embeddings[cache.prompt_ids[idx]]}
            state["trainable"], state["opt_state"], state["rng"], loss = step_fn(
                state["trainable"], frozen, state["opt_state"], state["rng"], batch)
            losses.append(float(loss))
            done = step + 1
            if cfg.train.log_every and done % cfg.train.log_every == 0:
                print(f"step {done}: loss {np.mean(losses[-cfg.train.log_every:]):.4f}", flush=True)
            if (every and done % every == 0) or done == cfg.train.num_steps or stop["signal"]:
                loop.Checkpoints.save(manager, done, state, {"step": done, "losses": losses})
            if stop["signal"]:
                raise loop.Preempted(f"[preempted] SIGTERM at step {done}: saved {workdir / 'checkpoints' / 'latest'}; "
                                     "rerun the same command to continue")
    finally:
        restore_sigterm()

    nnx.update(unet, state["trainable"])
    unet.eval()
    adapter = workdir / "adapter"
    save_adapter(adapter, unet, filt, config=cfg, base_hash=base_hash,
                 extra={"base": str(cfg.init.checkpoint), "dataset": cfg.dataset.name})
    if method_names(cfg.peft) == ["lora"]:
        export_lora_diffusers(unet, cfg.peft, adapter / "diffusers")
    results = {"method": cfg.peft.method, "model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
               "trainable_params": report["trainable_params"], "total_params": report["total_params"],
               "trainable_percent": report["trainable_percent"], "num_images": len(cache.latents),
               "num_prompts": len(cache.prompts), "num_devices": mesh.size, "steps_run": len(losses),
               "losses": losses, "train_seconds_this_run": time.time() - start}
    tmp = workdir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.rename(workdir / "results.json")
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    from absl import flags

    try:
        results = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except loop.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: schedulers requeue; rerunning continues from the saved step
    print(json.dumps({k: v for k, v in results.items() if k != "losses"}))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/sd15_<method>.py", lock_config=True)
    flags.DEFINE_string("workdir", "runs/t2i", "Output folder.")
    flags.mark_flag_as_required("config")
    runtime.run(main)
