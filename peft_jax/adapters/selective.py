"""Methods that tune a subset of the existing weights, chosen by a path regex (no surgery)."""
from __future__ import annotations

from flax import nnx

from peft_jax.adapters.core import WRAPPED, Method, path_regex, register


def _nothing(path, value) -> bool:
    del path, value
    return False


register(Method(
    name="full",
    doc="Full fine-tuning: every parameter trains.",
    trainable=lambda cfg: nnx.Param,
    archs=("vit", "cnn", "unet"),
))

register(Method(
    name="linear",
    doc="Linear probe: only the new classification head trains.",
    trainable=lambda cfg: _nothing,
))

register(Method(
    name="bitfit",
    doc="BitFit (Ben Zaken et al. 2022): every bias (linear, conv, LayerNorm/BatchNorm beta) and the head.",
    trainable=lambda cfg: path_regex(r"(^|/)bias$"),
))

register(Method(
    name="ln_tune",
    doc="LayerNorm tuning: scale and bias of every ViT LayerNorm, and the head.",
    trainable=lambda cfg: path_regex(rf"(^|/)norm\d*/{WRAPPED}(scale|bias)$"),
    archs=("vit",),
))

register(Method(
    name="attention_tune",
    doc="Attention tuning (Touvron et al. 2022): the query, key, value and output projections of every block.",
    trainable=lambda cfg: path_regex(rf"attn/{WRAPPED}(query|key|value|out)/{WRAPPED}(kernel|bias)$"),
    archs=("vit",),
))

register(Method(
    name="bn_tune",
    doc="BatchNorm tuning: gamma and beta of every ResNet BatchNorm, and the head.",
    trainable=lambda cfg: path_regex(rf"(^|/)bn\d*/{WRAPPED}(scale|bias)$"),
    archs=("cnn",),
))

