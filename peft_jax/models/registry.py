"""Model registry: names -> plain NNX classifiers (``create_model``), and the names of the other architectures
``from_pretrained`` loads. Imports only the model files: the weight loaders (peft_jax/checkpoints) import it."""
from __future__ import annotations

import dataclasses

from flax import nnx

from peft_jax.errors import UserError
from peft_jax.models.vit import VIT_VARIANTS, ViT, ViTConfig
from peft_jax.names import EFFICIENTNET_NAMES, MODEL_NAMES, RESNET_NAMES, unknown_name_error  # noqa: F401

DIFFUSION_ARCHS = ("unet2d_condition", "autoencoder_kl", "clip_text")  # loaded by checkpoints/diffusers.py
FEATURE_ARCHS = ("inception_v3_fid",)  # FID's Inception-v3, loaded by checkpoints/inception.py


def vit_config(name: str, *, num_classes: int, image_size: int, **overrides) -> ViTConfig:
    """The ViTConfig of a registered variant, with field overrides (e.g. patch_size, depth, pool)."""
    if name not in VIT_VARIANTS:
        raise unknown_name_error("ViT", name, tuple(VIT_VARIANTS))
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"unknown ViT option(s) {bad}; valid: {sorted(fields)}")
    kwargs = {**VIT_VARIANTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ViTConfig(num_classes=num_classes, image_size=image_size, **kwargs)


def efficientnet_config(name: str, *, num_classes: int, **overrides):
    """The EfficientNetConfig of a registered Lite variant; options: drop_connect_rate, dropout_rate."""
    from peft_jax.models.efficientnet import lite_config

    allowed = ("drop_connect_rate", "dropout_rate")
    extra = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
    if extra:
        raise UserError(f"EfficientNet-Lite takes only the model options {list(allowed)}, got {extra}")
    return lite_config(name, num_classes=num_classes, **{k: v for k, v in overrides.items() if v is not None})


def create_model(name: str, *, num_classes: int, image_size: int = 224, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    """Builds a randomly initialised model by registered name."""
    if name in VIT_VARIANTS:
        return ViT(vit_config(name, num_classes=num_classes, image_size=image_size, **overrides), rngs=rngs)
    if name in RESNET_NAMES:
        from peft_jax.models.resnet import ResNet

        extra = {k: v for k, v in overrides.items() if v is not None}
        if extra:
            raise UserError(f"ResNet takes no model options, got {sorted(extra)}")
        return ResNet(int(name.removeprefix("resnet")), num_classes=num_classes, rngs=rngs)
    if name in EFFICIENTNET_NAMES:
        from peft_jax.models.efficientnet import EfficientNet

        return EfficientNet(efficientnet_config(name, num_classes=num_classes, **overrides), rngs=rngs)
    raise unknown_name_error("model (model.name)", name, MODEL_NAMES)
