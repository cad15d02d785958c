"""``from_pretrained``: a checkpoint file, directory or registered name -> a ready NNX model."""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.checkpoints import efficientnet as efficientnet_ckpt
from peft_jax.checkpoints import resnet as resnet_ckpt
from peft_jax.checkpoints import vit as vit_ckpt
from peft_jax.checkpoints.core import (
    CheckpointError, KeyMapper, abstract_model, build, check_fit, decide_head, expected_shapes,
)
from peft_jax.checkpoints.formats import LAYOUTS, Checkpoint, read_checkpoint
from peft_jax.checkpoints.hub import repo_overrides
from peft_jax.checkpoints.registry import resolve_checkpoint
from peft_jax.errors import UserError
from peft_jax.models.registry import (
    DIFFUSION_ARCHS, EFFICIENTNET_NAMES, FEATURE_ARCHS, MODEL_NAMES, RESNET_NAMES, efficientnet_config,
    unknown_name_error, vit_config,
)
from peft_jax.models.efficientnet import EfficientNet
from peft_jax.models.resnet import ResNet
from peft_jax.models.vit import VIT_VARIANTS, ViT, resize_pos_embed

log = logging.getLogger("peft_jax.checkpoints")

HEAD = (("head", "kernel"), ("head", "bias"))


def _head_classes(converted: dict) -> int | None:
    return converted[("head", "bias")][1].shape[0] if ("head", "bias") in converted else None


def _where(ckpt: Checkpoint) -> str:
    return f"{ckpt.path} ({LAYOUTS[ckpt.layout][1]})"


def _load_resnet(arch: str, ckpt: Checkpoint, *, num_classes: int | None, rngs: nnx.Rngs, overrides: dict):
    extra = sorted(k for k, v in overrides.items() if v is not None)
    if extra:
        raise UserError(f"ResNet takes no model options, got {extra}")
    depth = int(arch.removeprefix("resnet"))
    where = _where(ckpt)
    if ckpt.hf_config:
        resnet_ckpt.check_hf_config(where, ckpt.hf_config, depth)
    m = KeyMapper(ckpt.arrays)
    convert = resnet_ckpt.convert_hf if ckpt.layout == "hf_resnet" else resnet_ckpt.convert_torchvision
    convert(m, depth)
    converted = m.converted
    n, reinit = decide_head(where, _head_classes(converted), num_classes)
    if reinit:
        for p in HEAD:
            converted.pop(p, None)

    def ctor(r):
        return ResNet(depth, num_classes=n, rngs=r)

    check_fit(where, m, converted, expected_shapes(ctor), fresh=HEAD if reinit else ())
    return build(ctor, {p: a for p, (_, a) in converted.items()}, fresh=HEAD if reinit else (), rngs=rngs)


def _load_efficientnet(arch: str, ckpt: Checkpoint, *, num_classes: int | None, rngs: nnx.Rngs, overrides: dict):
    where = _where(ckpt)
    base = efficientnet_config(arch, num_classes=1000, **overrides)
    m = KeyMapper(ckpt.arrays)
    efficientnet_ckpt.convert(m, base)
    converted = m.converted
    n, reinit = decide_head(where, _head_classes(converted), num_classes)
    if reinit:
        for p in HEAD:
            converted.pop(p, None)
    cfg = dataclasses.replace(base, num_classes=n)

    def ctor(r):
        return EfficientNet(cfg, rngs=r)

    # Dropout and stochastic depth draw from their own streams: seeded from `rngs`, not from the file.
    streams = tuple(p for p, v in nnx.to_flat_state(nnx.state(abstract_model(ctor), nnx.RngState)))
    fresh = (HEAD if reinit else ()) + streams
    check_fit(where, m, converted, expected_shapes(ctor), fresh=fresh)
    return build(ctor, {p: a for p, (_, a) in converted.items()}, fresh=fresh, rngs=rngs)


def _load_vit(
    arch: str, ckpt: Checkpoint, *, num_classes: int | None, image_size: int | None, rngs: nnx.Rngs, overrides: dict
):
    where = _where(ckpt)
    user = {k: v for k, v in overrides.items() if v is not None}
    # The format's numerics first, then anything the caller set explicitly.
    base = vit_config(arch, num_classes=1, image_size=224, **{**vit_ckpt.numerics(ckpt), **user})
    if ckpt.hf_config:
        vit_ckpt.check_hf_config(where, ckpt.hf_config, base)
    if ckpt.layout == "google_vit":
        vit_ckpt.check_google_heads(where, ckpt.arrays, base.num_heads)
    m = KeyMapper(ckpt.arrays)
    head_usable = vit_ckpt.CONVERTERS[ckpt.layout](m, base.depth)
    converted = m.converted

    n, reinit = decide_head(where, _head_classes(converted), num_classes, head_usable=head_usable)
    if reinit:
        for p in HEAD:
            converted.pop(p, None)
    native = vit_ckpt.native_image_size(converted, ckpt.hf_config, base.num_prefix_tokens)
    cfg = dataclasses.replace(base, num_classes=n, image_size=image_size or native or base.image_size)
    if ("pos_embed",) in converted and native and cfg.image_size != native:
        src, pos = converted[("pos_embed",)]
        log.warning("%s: position embeddings resized from %d px to %d px", where, native, cfg.image_size)
        pos = resize_pos_embed(jnp.asarray(pos), cfg.grid_size, cfg.num_prefix_tokens)
        converted[("pos_embed",)] = (src, np.asarray(pos))

    fresh = HEAD if reinit else ()
    unstacked = dataclasses.replace(cfg, scan_layers=False)  # checked block by block, named as in the file
    check_fit(where, m, converted, expected_shapes(lambda r: ViT(unstacked, rngs=r)), fresh=fresh)
    values = {p: a for p, (_, a) in converted.items()}
    if cfg.scan_layers:
        values = vit_ckpt.stack_blocks(values, cfg.depth)
    return build(lambda r: ViT(cfg, rngs=r), values, fresh=fresh, rngs=rngs)


def from_pretrained(arch: str, path, **kwargs) -> nnx.Module:
    """Any registered architecture with a checkpoint's weights: Stable Diffusion components from a diffusers
    folder, FID's Inception-v3 from pytorch-fid's weights, classifiers as ``load_classifier``."""
    if arch in DIFFUSION_ARCHS:
        from peft_jax.checkpoints.diffusers import from_pretrained as load_diffusers

        return load_diffusers(arch, path, **kwargs)
    if arch in FEATURE_ARCHS:
        from peft_jax.checkpoints.inception import from_pretrained as load_inception

        return load_inception(path, **kwargs)
    return load_classifier(arch, path, **kwargs)


def load_classifier(
    arch: str,
    path: str | pathlib.Path,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides,
) -> nnx.Module:
    """The `arch` model (a registered name such as ``vit_b16`` or ``resnet50``) with a checkpoint's weights.

    `path` is a checkpoint file, a Hugging Face directory, or a registered checkpoint name
    (downloaded into the cache). The format is detected from the file. The head is kept
    when the checkpoint has one with ``num_classes`` classes (or num_classes is None), else
    re-initialised from `rngs`. A ViT's position embeddings are resized when `image_size`
    differs from the checkpoint's. ViT `overrides` are ViTConfig fields (e.g. ``scan_layers``,
    ``remat``, ``dtype``). The model is returned in eval mode.
    """
    if arch not in MODEL_NAMES:
        raise unknown_name_error("model", arch, MODEL_NAMES + DIFFUSION_ARCHS + FEATURE_ARCHS)
    ckpt = read_checkpoint(resolve_checkpoint(path, arch=arch))
    family = "resnet" if arch in RESNET_NAMES else "efficientnet" if arch in EFFICIENTNET_NAMES else "vit"
    if LAYOUTS[ckpt.layout][0] != family:
        raise CheckpointError(f"{_where(ckpt)} holds a {LAYOUTS[ckpt.layout][0]}, but arch is {arch}")
    if ckpt.hf_config is not None:  # a timm or transformers folder (local or from the Hub) names its network
        overrides = repo_overrides(arch, family, ckpt.hf_config, _where(ckpt), overrides)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if arch in VIT_VARIANTS:
        return _load_vit(arch, ckpt, num_classes=num_classes, image_size=image_size, rngs=rngs, overrides=overrides)
    if arch in EFFICIENTNET_NAMES:
        return _load_efficientnet(arch, ckpt, num_classes=num_classes, rngs=rngs, overrides=overrides)
    return _load_resnet(arch, ckpt, num_classes=num_classes, rngs=rngs, overrides=overrides)
