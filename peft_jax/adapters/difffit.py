"""DiffFit (Xie et al. 2023): BitFit plus LayerNorm tuning plus a learned scale on every block's branches.

``x + g1 * attn(norm1(x))`` and ``x + g2 * mlp(norm2(x))`` with per-channel ``g`` starting at one;
every bias and LayerNorm scale trains too. The scales sit on the outputs of ``attn/out`` and
``mlp/fc2``, so they fold into those layers (merge); the tuned biases and norms are weights already.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from peft_jax.adapters.core import WRAPPED, Method, adapter_variables, any_of, arch_family, path_regex, register, wrap_modules
from peft_jax.adapters.ia3 import ChannelScale, merge_channel_scales


# The residual branches that get a scale: a ViT block's attention and MLP; a U-Net transformer block's
# self-attention, cross-attention and feed-forward.
BRANCHES = {"vit": r"(attn/out|mlp/fc2)$", "unet": r"(attn1/to_out|attn2/to_out|ff/out)$"}


def difffit_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg, rngs
    wrap_modules(model, (nnx.Linear,), BRANCHES[arch_family(model)], lambda p, m: ChannelScale(m, "out"),
                 what="difffit")


register(Method(
    name="difffit",
    doc="DiffFit: every bias, every LayerNorm scale, and a learned per-channel scale on each attention and MLP branch.",
    trainable=lambda cfg: any_of(adapter_variables, path_regex(r"(^|/)bias$"),
                                 path_regex(rf"(^|/)(norm\d*|conv_norm_out)/{WRAPPED}scale$")),
    surgery=difffit_surgery,
    merge=merge_channel_scales,
    archs=("vit", "unet"),
))
