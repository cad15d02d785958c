"""FacT (Jie & Deng 2023): the weight updates of the whole ViT as one factorised tensor.

Every attention projection and MLP layer is cut into width x width blocks (q, k, v, out: one
each; fc1 and fc2: four each; 12 per block). Each block's update is ``s * U C_i V`` with ``U``
(width, r) and ``V`` (r, width) shared by all blocks of all layers and a small core ``C_i``:

- ``fact_tt`` (tensor train): every block has its own r x r core.
- ``fact_tk`` (Tucker): the cores come from one shared r x r x r tensor ``G`` and a column of
  ``P`` per block, ``T_i = sum_k G[:, :, k] P[k, i]``. The attention projections take
  ``C = T_i``. For the MLP, ``peft.fact_tk_mlp`` chooses between the two definitions:
  ``"paper"`` (Jie & Deng's equations: fc1's output block m and fc2's input block m take
  ``C_m = T_m``) and ``"official"`` (the default: what JieShibo/PETL-ViT ``FacT/fact_tk.py``,
  ``fact_forward_mlp``, and PETL_Vision ``model/fact.py`` compute, and so what the published
  FacT-TK numbers come from). The official code stacks the four (r, r) slices into (r, r, 4),
  reshapes that to (r, 4r) and slices it per block, which interleaves them:
  fc1's block m takes ``C_m[a, s] = T[a, (m r + s) // 4, (m r + s) % 4]``, and fc2 multiplies by
  the transpose, ``C_m[a, s] = T[s, (m r + a) // 4, (m r + a) % 4]``. Both are the same family
  with the same parameters; only the map from ``P`` and ``G`` to the MLP cores differs.

``V`` starts at zero (the identity), ``U`` and the cores as in the reference code; dropout
(``peft.dropout``, default 0.1) acts on the core's output, scale ``peft.scale`` (default 1),
rank ``peft.rank``. The update is linear, so FacT merges. ``U``, ``V`` and ``G`` are
``SharedAdapterParam``: a scanned ViT keeps them out of its stacked layer axis, while the
per-layer cores and ``P`` columns get that axis like any adapter parameter.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    AdapterParam, Method, SharedAdapterParam, adapter_dropout, adapter_variables, iter_wrapped, leading_shape,
    modules_matching, register, replace_module,
)
from peft_jax.errors import UserError
from peft_jax.models.init import draw

TARGETS = r"(attn/(query|key|value|out)|mlp/(fc1|fc2))$"
TK_MLP_FORMS = ("official", "paper")


class FacTShared(nnx.Module):
    """The factors every FacT layer shares: U, V, the Tucker core tensor (fact_tk) and the dropout."""

    def __init__(self, width: int, rank: int, tucker: bool, num_cores: int, dropout: nnx.Dropout, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default (Kaiming-uniform, a=sqrt(5))
        self.u = SharedAdapterParam(draw(jax.random.uniform, rngs.params(), (width, rank), -bound, bound))
        self.v = SharedAdapterParam(jnp.zeros((rank, width), jnp.float32))
        self.tucker = tucker
        if tucker:  # Xavier-uniform on (r, r, r): fans r*r and r*r
            g = math.sqrt(6.0 / (2 * rank * rank))
            self.core_tensor = SharedAdapterParam(
                draw(jax.random.uniform, rngs.params(), (rank, rank, rank), -g, g))
            # P is one (r, num_cores) Xavier-uniform matrix in the paper; each layer holds its own columns.
            self.p_bound = math.sqrt(6.0 / (rank + num_cores))
        self.dropout = dropout


class FacTLinear(nnx.Module):
    """``base(x) + s * blockwise(U C V)``: the kernel (nin*w, nout*w) gets one r x r core per w x w block."""

    def __init__(self, base: nnx.Linear, shared: FacTShared, scale: float, *, rngs: nnx.Rngs,
                 official_mlp: bool = False):
        kernel = base.kernel[...]
        lead = leading_shape(kernel, 2)  # (depth,) in a scanned model
        din, dout = kernel.shape[-2:]
        width, rank = shared.u[...].shape
        if din % width or dout % width:
            raise ValueError(f"fact: a {din}x{dout} layer is not made of {width}x{width} blocks")
        self.base = base
        self.shared = shared
        self.scale = scale
        self.blocks = (din // width, dout // width)
        n = self.blocks[0] * self.blocks[1]
        # fact_tk's official MLP cores (module docstring): fc1 is one row of blocks, fc2 one column.
        self.official_mlp = official_mlp and n > 1 and 1 in self.blocks
        if shared.tucker:
            self.p = AdapterParam(draw(jax.random.uniform, rngs.params(), lead + (rank, n),
                                       -shared.p_bound, shared.p_bound))
        else:  # one nn.Linear(r * nin, r * nout, bias=False) per layer in the reference code
            bound = 1.0 / math.sqrt(rank * self.blocks[0])
            self.cores = AdapterParam(draw(jax.random.uniform, rngs.params(), lead + self.blocks + (rank, rank),
                                           -bound, bound))

    def core(self) -> jax.Array:
        """(..., nin, nout, r, r), with the stacked layer axis of a scanned model in front when merging."""
        if not self.shared.tucker:
            return self.cores[...]
        p = self.p[...]
        r, n = p.shape[-2:]
        lead = p.shape[:-2]
        if not self.official_mlp:
            cores = jnp.einsum("abk,...kn->...nab", self.shared.core_tensor[...], p)
            return cores.reshape(lead + self.blocks + (r, r))
        # (r, r, n) -> (r, n r) -> one (r, r) slice per block: t[a, m, s] = T[a, (m r + s) // n, (m r + s) % n]
        t = jnp.einsum("abk,...kn->...abn", self.shared.core_tensor[...], p).reshape(lead + (r, n, r))
        k = len(lead)
        if self.blocks[0] == 1:  # fc1: output block m, C_m = t[:, m, :]
            cores = jnp.moveaxis(t, k + 1, k)
        else:  # fc2: input block m, C_m = t[:, m, :] transposed
            cores = jnp.moveaxis(t, (k + 1, k + 2), (k, k + 1))
        return cores.reshape(lead + self.blocks + (r, r))

    def delta(self) -> jax.Array:
        """The kernel update (..., in, out)."""
        u, v = self.shared.u[...], self.shared.v[...]
        d = jnp.einsum("ar,...ijrs,sb->...iajb", u, self.core(), v)
        return self.scale * d.reshape(d.shape[:-4] + (u.shape[0] * self.blocks[0], v.shape[1] * self.blocks[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        u, v = self.shared.u[...].astype(dt), self.shared.v[...].astype(dt)
        nin, nout = self.blocks
        h = x.reshape(x.shape[:-1] + (nin, u.shape[0])) @ u  # (..., nin, r)
        h = jnp.einsum("...ir,ijrs->...js", h, self.core().astype(dt))  # (..., nout, r)
        h = self.shared.dropout(h) @ v  # (..., nout, w)
        return self.base(x) + self.scale * h.reshape(x.shape[:-1] + (nout * v.shape[1],))


def _surgery(tucker: bool):
    name = "fact_tk" if tucker else "fact_tt"

    def surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        rank = int(cfg.rank)
        if rank < 1:
            raise UserError(f"peft.rank must be a positive integer, got {cfg.rank}")
        targets = modules_matching(model, (nnx.Linear,), TARGETS)
        if not targets:
            raise UserError(f"{name}: no attention or MLP linear layers found")
        width = model.config.hidden_size
        num_cores = sum(m.kernel[...].size // width**2 for _, m in targets)  # all layers, stacked or not
        rate = float(cfg.dropout) if cfg.get("dropout") is not None else 0.1
        dropout = adapter_dropout(model, rate, rngs, what=f"{name} (peft.dropout)")
        shared = FacTShared(width, rank, tucker, num_cores, dropout, rngs=rngs)
        scale = float(cfg.scale) if cfg.get("scale") is not None else 1.0
        mlp_form = str(cfg.get("fact_tk_mlp") or "official")
        if tucker and mlp_form not in TK_MLP_FORMS:
            raise UserError(f"peft.fact_tk_mlp must be one of {TK_MLP_FORMS}, got {mlp_form!r}")
        official = tucker and mlp_form == "official"
        for path, m in sorted(targets, key=lambda t: -len(t[0])):
            replace_module(model, path, FacTLinear(m, shared, scale, rngs=rngs, official_mlp=official))

    return surgery


def fact_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, FacTLinear):
        base = wrapper.base
        kernel = base.kernel[...]
        base.kernel[...] = (kernel + wrapper.delta()).astype(kernel.dtype)
        replace_module(model, path, base)


register(Method(
    name="fact_tt",
    doc="FacT-TT: tensor-train-factorised updates of all attention and MLP weights (shared U, V; r x r cores).",
    trainable=lambda cfg: adapter_variables,
    surgery=_surgery(tucker=False),
    merge=fact_merge,
    archs=("vit",),
))

register(Method(
    name="fact_tk",
    doc="FacT-TK: Tucker-factorised updates of all attention and MLP weights (shared U, V and core tensor; "
        "peft.fact_tk_mlp: the official code's MLP cores or the paper's).",
    trainable=lambda cfg: adapter_variables,
    surgery=_surgery(tucker=True),
    merge=fact_merge,
    archs=("vit",),
))
