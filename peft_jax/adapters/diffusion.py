"""PEFT methods for the Stable Diffusion U-Net (Dutt et al. 2024, section 5; Han et al. 2023).

Selective methods tune existing weights chosen by path: ``attention`` (the q/k/v/out projections
of every self- and cross-attention), ``bias`` (every bias, norms' included), ``norm`` (scale and
bias of every GroupNorm and LayerNorm) and their unions. ``svdiff`` adds a learned shift to the
singular values of every linear and conv kernel. ``full``, ``lora`` (``peft.targets`` naming
``attn1|attn2`` projections, see configs/sd15_lora.py) and ``difffit`` are registered elsewhere and
recognise the U-Net too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    WRAPPED, AdapterParam, Method, adapter_variables, any_of, iter_wrapped, path_regex, register, replace_module,
    wrap_modules,
)

ATTENTION = rf"attn[12]/{WRAPPED}(to_q|to_k|to_v|to_out)/{WRAPPED}(kernel|bias)$"
BIAS = r"(^|/)bias$"
NORM = rf"(^|/)(norm\d*|conv_norm_out)/{WRAPPED}(scale|bias)$"


def _selective(name: str, doc: str, *patterns: str) -> Method:
    return register(Method(name=name, doc=doc, trainable=lambda cfg: any_of(*(path_regex(p) for p in patterns)),
                           archs=("unet",)))


_selective("attention", "Attention tuning: the q/k/v/out projections of every U-Net self- and cross-attention.",
           ATTENTION)
_selective("bias", "Bias tuning: every bias of the U-Net (convs, linears, GroupNorm/LayerNorm beta).", BIAS)
_selective("norm", "Norm tuning: scale and bias of every U-Net GroupNorm and LayerNorm.", NORM)
_selective("norm_bias", "Norm and bias tuning: the union of norm and bias.", NORM, BIAS)
_selective("norm_bias_attention", "Norm, bias and attention tuning: the union of the three.", NORM, BIAS, ATTENTION)


class SpectralBasis(nnx.Variable):
    """Frozen singular vectors and values of a kernel (state, not a parameter: never trained or counted)."""


class SpectralShift(nnx.Module):
    """SVDiff: ``W + U diag(relu(s + delta) - s) V^T`` for a kernel ``W = U diag(s) V^T``, ``delta`` trained.

    A conv kernel is taken as a (kh * kw * in, out) matrix. Writing the update as a difference from
    ``W`` keeps the wrapped layer exact at initialisation (delta = 0), whatever the SVD's rounding.
    The singular vectors are frozen ``SpectralBasis`` state, not parameters.
    """

    def __init__(self, base: nnx.Linear | nnx.Conv):
        kernel = base.kernel[...]
        u, s, vt = jnp.linalg.svd(kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32), full_matrices=False)
        self.base = base
        self.u, self.s, self.vt = SpectralBasis(u), SpectralBasis(s), SpectralBasis(vt)
        self.delta = AdapterParam(jnp.zeros_like(s))

    def update(self) -> jax.Array:
        s = self.s[...]
        shift = jax.nn.relu(s + self.delta[...]) - s
        kernel = self.base.kernel[...]
        return ((self.u[...] * shift) @ self.vt[...]).reshape(kernel.shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        base = self.base
        kernel = (base.kernel[...] + self.update()).astype(base.kernel[...].dtype)
        if isinstance(base, nnx.Linear):
            y = x @ kernel.astype(x.dtype)
        else:
            y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), base.strides, base.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + base.bias[...].astype(y.dtype) if base.bias is not None else y


def svdiff_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del rngs
    wrap_modules(model, (nnx.Linear, nnx.Conv), cfg.get("svdiff_targets"), lambda p, m: SpectralShift(m),
                 what="svdiff (peft.svdiff_targets)")


def svdiff_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, SpectralShift):
        base = wrapper.base
        base.kernel[...] = (base.kernel[...] + wrapper.update()).astype(base.kernel[...].dtype)
        replace_module(model, path, base)


register(Method(
    name="svdiff",
    doc="SVDiff: a learned shift of the singular values of every linear and conv kernel (peft.svdiff_targets: a "
        "regex narrowing them).",
    trainable=lambda cfg: adapter_variables,
    surgery=svdiff_surgery,
    merge=svdiff_merge,
    archs=("unet",),
))
