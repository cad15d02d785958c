"""``from_pretrained`` for diffusers-layout folders: the SD U-Net, VAE, CLIP text encoder, tokenizer, scheduler.

A path is a component folder (``unet/``, ``vae/``, ``text_encoder/`` with ``config.json`` and
safetensors weights) or a whole pipeline folder holding them. Only safetensors are read:
diffusers' ``.bin`` files are pickles. Keys map one to one onto the NNX module tree (a torch
``weight`` becomes ``kernel``/``scale``/``embedding``), and the strict checks of
``checkpoints.core`` report every missing, unexpected and mis-shaped key together.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from peft_jax.checkpoints.core import CheckpointError, KeyMapper, build, check_fit, expected_shapes, torch_conv, torch_linear
from peft_jax.checkpoints.formats import _read_safetensors
from peft_jax.errors import UserError
from peft_jax.files import read_json
from peft_jax.models.diffusion.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from peft_jax.models.diffusion.schedulers import SchedulerConfig
from peft_jax.models.diffusion.unet import UNet2DConditionModel, UNetConfig
from peft_jax.models.diffusion.vae import AutoencoderKL, VAEConfig

# arch -> (pipeline subfolder, weights file stem, model class)
ARCHS = {
    "unet2d_condition": ("unet", "diffusion_pytorch_model", UNet2DConditionModel),
    "autoencoder_kl": ("vae", "diffusion_pytorch_model", AutoencoderKL),
    "clip_text": ("text_encoder", "model", CLIPTextModel),
}

# Settings of a diffusers U-Net config that change the architecture away from SD 1.x/2.x, with their
# neutral values: a config that sets one otherwise is refused rather than silently mis-built.
_UNET_NEUTRAL = {
    "act_fn": "silu", "addition_embed_type": None, "class_embed_type": None, "num_class_embeds": None,
    "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "attention_type": "default", "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "cross_attention_norm": None, "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None, "dropout": 0.0,
}
FIX = "download or copy the pipeline folder again"  # a pipeline file that does not parse
_VAE_NEUTRAL = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


def _fields(cls: type, config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise UserError(f"unknown {cls.__name__} option(s) {bad}; valid: {sorted(names)}")
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    return {**out, **{k: v for k, v in overrides.items() if v is not None}}


def _refuse(where: str, config: dict[str, Any], neutral: dict[str, Any]) -> None:
    def neutral_value(value, default) -> bool:
        values = value if isinstance(value, list) else [value]  # some settings are given per block
        return all(v is None or v == default for v in values)

    odd = sorted(f"{k}={config[k]!r}" for k, v in neutral.items() if not neutral_value(config.get(k), v))
    if odd:
        raise CheckpointError(f"{where}: unsupported architecture settings {odd} (Stable Diffusion 1.x/2.x only)")


def unet_config(where: str, config: dict[str, Any], **overrides) -> UNetConfig:
    _refuse(where, config, _UNET_NEUTRAL)
    return UNetConfig(**_fields(UNetConfig, config, overrides))


def vae_config(where: str, config: dict[str, Any], **overrides) -> VAEConfig:
    _refuse(where, config, _VAE_NEUTRAL)
    kinds = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise CheckpointError(f"{where}: unsupported VAE blocks {sorted(kinds)}")
    return VAEConfig(**_fields(VAEConfig, config, overrides))


def clip_config(where: str, config: dict[str, Any], **overrides) -> CLIPTextConfig:
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise CheckpointError(f"{where}: model_type {config['model_type']!r} is not a CLIP text model")
    return CLIPTextConfig(**_fields(CLIPTextConfig, config, overrides))


def component_dir(path: str | pathlib.Path, arch: str) -> pathlib.Path:
    """The folder holding ``arch``'s config and weights: ``path`` itself or its pipeline subfolder."""
    path = pathlib.Path(path).expanduser()
    sub = ARCHS[arch][0]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; give a diffusers Stable Diffusion pipeline folder (or a "
                              "component's folder with its config.json)")
    for candidate in (path, path / sub):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: no config.json here nor in {path / sub}")


def read_weights(folder: pathlib.Path, stem: str) -> dict[str, np.ndarray]:
    """The safetensors weights of a component folder (single file, sharded index, or fp16 variant)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return _read_safetensors(folder / name)
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
        if (folder / name).is_file():
            arrays = {}
            for shard in sorted(set(read_json(folder / name, FIX)["weight_map"].values())):
                arrays.update(_read_safetensors(folder / shard))
            return arrays
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {pickles}: pickled torch files are not read; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors{hint}")


# Checkpoint-name rewrites onto the module tree (applied in order to ".name." with dots around).
_RENAMES = {
    "unet2d_condition": ((".to_out.0.", ".to_out."), (".ff.net.0.proj.", ".ff.proj."), (".ff.net.2.", ".ff.out.")),
    # Old SD VAE files use the pre-0.14 attention names.
    "autoencoder_kl": ((".to_out.0.", ".to_out."), (".query.", ".to_q."), (".key.", ".to_k."),
                       (".value.", ".to_v."), (".proj_attn.", ".to_out.")),
    "clip_text": (),
}
_DROPPED = ("embeddings.position_ids", "text_projection.weight", "logit_scale")


def checkpoint_module_name(path: tuple, arch: str = "unet2d_condition") -> str:
    """The dotted name diffusers gives the module at our ``path`` (the load-time renames, inverted):
    ('mid_block', 'attentions', 0, ..., 'attn1', 'to_out') -> 'mid_block.attentions.0....attn1.to_out.0'."""
    name = "." + ".".join(str(p) for p in path) + "."
    for checkpoint_name, module_name in reversed(_RENAMES[arch]):
        name = name.replace(module_name, checkpoint_name)
    return name.strip(".")


def _target(key: str, ndim: int, arch: str) -> tuple[tuple, str]:
    """(model path, how to convert) for one checkpoint key."""
    name = "." + key.removeprefix("text_model.") + "."
    for old, new in _RENAMES[arch]:
        name = name.replace(old, new)
    *parts, leaf = name.strip(".").split(".")
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    if leaf == "bias":
        return path + ("bias",), "same"
    if leaf != "weight":
        return path + (leaf,), "same"
    if parts[-1].endswith("_embedding"):
        return path + ("embedding",), "same"
    return path + ({1: "scale", 2: "kernel", 4: "kernel"}[ndim],), {1: "same", 2: "linear", 4: "conv"}[ndim]


def convert(arrays: dict[str, np.ndarray], arch: str, expected: dict[tuple, tuple[int, ...]]) -> KeyMapper:
    """Maps every key onto the model; 1x1-conv attention weights of old VAEs become linear kernels."""
    m = KeyMapper(arrays)
    for key, array in arrays.items():
        if key.removeprefix("text_model.") in _DROPPED:
            m.drop(key)
            continue
        path, kind = _target(key, array.ndim, arch)
        if kind == "conv" and len(expected.get(path, ())) == 2:  # an old VAE's (out, in, 1, 1) attention weight
            kind, squeeze = "linear", True
        else:
            squeeze = False

        def fn(a, kind=kind, squeeze=squeeze):
            a = a[:, :, 0, 0] if squeeze else a
            if kind == "linear":
                return torch_linear(a)
            return torch_conv(a) if kind == "conv" else a

        m.map(path, key, fn)
    return m


def from_pretrained(arch: str, path: str | pathlib.Path, *, rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """The ``arch`` model (``unet2d_condition``, ``autoencoder_kl`` or ``clip_text``) of a diffusers folder.

    ``overrides`` are fields of the model's config dataclass (e.g. ``dtype="bfloat16"``, ``remat=True``).
    The model is returned in eval mode.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown diffusion arch {arch!r}; valid: {sorted(ARCHS)}")
    folder = component_dir(path, arch)
    config = read_json(folder / "config.json", FIX)
    where = str(folder)
    make = {"unet2d_condition": unet_config, "autoencoder_kl": vae_config, "clip_text": clip_config}[arch]
    cfg = make(where, config, **overrides)
    cls = ARCHS[arch][2]

    def ctor(r):
        return cls(cfg, rngs=r)

    expected = expected_shapes(ctor)
    m = convert(read_weights(folder, ARCHS[arch][1]), arch, expected)
    check_fit(where, m, m.converted, expected)
    return build(ctor, {p: a for p, (_, a) in m.converted.items()}, rngs=rngs if rngs is not None else nnx.Rngs(0))


def load_tokenizer(path: str | pathlib.Path) -> CLIPTokenizer:
    """The CLIP tokenizer of a ``tokenizer/`` folder or a pipeline folder."""
    path = pathlib.Path(path).expanduser()
    return CLIPTokenizer.from_dir(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def load_scheduler_config(path: str | pathlib.Path) -> SchedulerConfig:
    """The noise schedule of a pipeline folder (``scheduler/scheduler_config.json``)."""
    path = pathlib.Path(path).expanduser()
    for f in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if f.is_file():
            return SchedulerConfig.from_diffusers(read_json(f, FIX))
    raise CheckpointError(f"{path}: no scheduler/scheduler_config.json")


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion pipeline folder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerConfig


def load_pipeline(path: str | pathlib.Path, *, dtype: str | None = None) -> StableDiffusion:
    """Every component of a diffusers Stable Diffusion folder (``dtype`` sets all models' compute dtype)."""
    return StableDiffusion(
        unet=from_pretrained("unet2d_condition", path, dtype=dtype),
        vae=from_pretrained("autoencoder_kl", path, dtype=dtype),
        text_encoder=from_pretrained("clip_text", path, dtype=dtype),
        tokenizer=load_tokenizer(path),
        scheduler=load_scheduler_config(path),
    )
