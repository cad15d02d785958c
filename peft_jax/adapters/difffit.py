"""DiffFit (Xie et al. 2023): BitFit plus LayerNorm tuning plus a learned scale on every block's branches.

``x + g1 * attn(norm1(x))`` and ``x + g2 * mlp(norm2(x))`` with per-channel ``g`` starting at one;
every bias and LayerNorm scale trains too. The scales sit on the outputs of ``attn/out`` and
``mlp/fc2``, so they fold into those layers (merge); the tuned biases and norms are weights already.

On the Stable Diffusion U-Net, as mkshing/DiffFit-pytorch (``diffusers_models/attention.py``:
``gamma_attn1``, ``gamma_attn2``, ``gamma_ff`` on each transformer block's branches;
``attention_processor.py`` ``DiffFitAttnProcessor``: ``gamma_q``, ``gamma_k``, ``gamma_v`` on the
query, key and value projections and ``gamma_fnn`` on the output projection of every attention),
so an attention output is scaled twice (``gamma_attn * gamma_fnn * to_out(.)``), as there; its
``utils.py`` trains every parameter named bias, norm or gamma.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from peft_jax.adapters.core import WRAPPED, Method, adapter_variables, any_of, arch_family, path_regex, register, wrap_modules
from peft_jax.adapters.ia3 import ChannelScale, merge_channel_scales


# The residual branches that get a scale: a ViT block's attention and MLP; a U-Net transformer block's
# self-attention, cross-attention and feed-forward.
BRANCHES = {"vit": r"(attn/out|mlp/fc2)$", "unet": r"(attn1/to_out|attn2/to_out|ff/out)$"}
# The U-Net reference's attention processor scales: gamma_q, gamma_k, gamma_v and gamma_fnn (inside gamma_attn).
UNET_PROJECTIONS = r"attn[12]/(to_q|to_k|to_v|to_out)$"


def difffit_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg, rngs
    family = arch_family(model)
    if family == "unet":
        wrap_modules(model, (nnx.Linear,), UNET_PROJECTIONS, lambda p, m: ChannelScale(m, "out"), what="difffit")
    wrap_modules(model, (nnx.Linear,), BRANCHES[family], lambda p, m: ChannelScale(m, "out"), what="difffit")


register(Method(
    name="difffit",
    doc="DiffFit: every bias, every LayerNorm scale, and a learned per-channel scale on each attention and MLP branch "
        "(U-Net: also on every attention's q, k, v and output projections, as the reference).",
    trainable=lambda cfg: any_of(adapter_variables, path_regex(r"(^|/)bias$"),
                                 path_regex(rf"(^|/)(norm\d*|conv_norm_out)/{WRAPPED}scale$")),
    surgery=difffit_surgery,
    merge=merge_channel_scales,
    archs=("vit", "unet"),
))
