"""PEFT methods for the Stable Diffusion U-Net (Dutt et al. 2024, section 5; Han et al. 2023).

Selective methods tune existing weights chosen by path, as the seed author's code defines them
(Raman1121/Diffusion_Memorization_HPO ``adaptors.py``: ``enable_attention_update``,
``enable_bias_update``, ``enable_norm_update``): ``attention`` (every parameter of the U-Net's
attention blocks, the ``attentions`` Transformer2DModels: their GroupNorm, proj_in/proj_out,
self- and cross-attention, feed-forward and LayerNorms; ``peft.attention_scope="projections"``
narrows it to the q/k/v/out projections of attn1 and attn2), ``bias`` (every parameter named
bias, norms' included), ``norm`` (every parameter with "norm" in its name: scale and bias of
every GroupNorm and LayerNorm) and their unions. ``svdiff`` adds a learned shift to the
singular values of every linear and conv kernel and of every GroupNorm and LayerNorm scale (a
(1, C) matrix: one singular value, its norm), as mkshing/svdiff-pytorch ``layers.py`` and
``train_svdiff.py``. ``full``, ``lora`` (``peft.targets`` naming
``attn1|attn2`` projections, see configs/sd15_lora.py) and ``difffit`` are registered elsewhere and
recognise the U-Net too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    WRAPPED, AdapterParam, Method, adapter_variables, any_of, iter_wrapped, modules_matching, path_regex, register,
    replace_module, wrap_modules,
)
from peft_jax.errors import UserError

ATTENTION_SCOPES = {
    "transformer": r"(^|/)attentions/",  # the reference's ``"attentions" in name``
    "projections": rf"attn[12]/{WRAPPED}(to_q|to_k|to_v|to_out)/{WRAPPED}(kernel|bias)$",
}
BIAS = r"(^|/)bias$"
NORM = rf"(^|/)(norm\d*|conv_norm_out)/{WRAPPED}(scale|bias)$"


def attention_pattern(cfg: ml_collections.ConfigDict) -> str:
    scope = str(cfg.get("attention_scope") or "transformer")
    if scope not in ATTENTION_SCOPES:
        raise UserError(f"peft.attention_scope must be one of {sorted(ATTENTION_SCOPES)}, got {scope!r}")
    return ATTENTION_SCOPES[scope]


def _selective(name: str, doc: str, *parts: str) -> Method:
    def trainable(cfg):
        patterns = {"attention": attention_pattern(cfg), "bias": BIAS, "norm": NORM}
        return any_of(*(path_regex(patterns[part]) for part in parts))

    return register(Method(name=name, doc=doc, trainable=trainable, archs=("unet",)))


_selective("attention", "Attention tuning: every parameter of the U-Net's attention blocks (peft.attention_scope="
           "'projections': the q/k/v/out projections of every self- and cross-attention).", "attention")
_selective("bias", "Bias tuning: every bias of the U-Net (convs, linears, GroupNorm/LayerNorm beta).", "bias")
_selective("norm", "Norm tuning: scale and bias of every U-Net GroupNorm and LayerNorm.", "norm")
_selective("norm_bias", "Norm and bias tuning: the union of norm and bias.", "norm", "bias")
_selective("norm_bias_attention", "Norm, bias and attention tuning: the union of the three.", "norm", "bias",
           "attention")


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


class NormSpectralShift(nnx.Module):
    """SVDiff on a norm's scale ``w``, taken as a (1, C) matrix (the reference's ``SVDGroupNorm`` /
    ``SVDLayerNorm``): its one singular value is ``|w|``, so the scale becomes ``w relu(|w| + delta) / |w|``.

    Computed as ``base(x) + normalised(x) * (scale' - w)`` with a scale- and bias-free copy of the
    norm, so the wrapped norm is exact at ``delta = 0``.
    """

    def __init__(self, base: nnx.GroupNorm | nnx.LayerNorm):
        w = base.scale[...].astype(jnp.float32)
        s = jnp.linalg.norm(w)
        self.base = base
        self.s, self.direction = SpectralBasis(s[None]), SpectralBasis(w / s)
        self.delta = AdapterParam(jnp.zeros((1,), jnp.float32))
        same = dict(epsilon=base.epsilon, use_fast_variance=base.use_fast_variance, dtype=base.dtype,
                    use_bias=False, use_scale=False, rngs=nnx.Rngs(0))
        if isinstance(base, nnx.GroupNorm):
            self.normalise = nnx.GroupNorm(w.shape[-1], num_groups=base.num_groups, **same)
        else:
            self.normalise = nnx.LayerNorm(w.shape[-1], **same)

    def update(self) -> jax.Array:
        s = self.s[...]
        return self.direction[...] * (jax.nn.relu(s + self.delta[...]) - s)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.normalise(x) * self.update().astype(x.dtype)


def svdiff_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del rngs
    targets = cfg.get("svdiff_targets")
    wrap_modules(model, (nnx.Linear, nnx.Conv), targets, lambda p, m: SpectralShift(m),
                 what="svdiff (peft.svdiff_targets)")
    norms = modules_matching(model, (nnx.GroupNorm, nnx.LayerNorm), targets)
    for path, norm in norms:
        if norm.scale is not None:
            replace_module(model, path, NormSpectralShift(norm))


def svdiff_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, SpectralShift):
        base = wrapper.base
        base.kernel[...] = (base.kernel[...] + wrapper.update()).astype(base.kernel[...].dtype)
        replace_module(model, path, base)
    for path, wrapper in iter_wrapped(model, NormSpectralShift):
        base = wrapper.base
        base.scale[...] = (base.scale[...] + wrapper.update()).astype(base.scale[...].dtype)
        replace_module(model, path, base)


register(Method(
    name="svdiff",
    doc="SVDiff: a learned shift of the singular values of every linear and conv kernel and of every GroupNorm and "
        "LayerNorm scale (peft.svdiff_targets: a regex narrowing them).",
    trainable=lambda cfg: adapter_variables,
    surgery=svdiff_surgery,
    merge=svdiff_merge,
    archs=("unet",),
))
