"""Attribution maps of a classifier's decision, jitted and batched, for any model of the registry.

Every map is (N, H, W) at the input resolution, for one target class per image:

- ``gradcam`` (Selvaraju et al. 2017): the class gradient averaged over the positions of the model's
  Grad-CAM layer weights its channels; the ReLU of the weighted sum, bilinearly upsampled. A model
  declares its layer with two methods, ``feature_map(images)`` and ``logits_from_feature_map(f)``
  (``model(images) == logits_from_feature_map(feature_map(images))``): the last convolutional
  stage for CNNs (N, h, w, C), the tokens entering the last block for ViTs (N, tokens, D), whose
  last (H / patch)^2 tokens are the patch grid (class and prompt tokens come first).
- ``gxi``: gradient x input, summed over the colour channels.
- ``ig`` (Sundararajan et al. 2017): integrated gradients from a baseline image, midpoint rule with
  ``steps`` points; the channel sum of the attributions adds up to logit(x) - logit(baseline) as
  the steps grow (completeness).
- ``rollout`` (Abnar & Zuidema 2020, ViTs only): the head-averaged attention of every block, plus
  the identity for the residual, row-normalised and multiplied through the blocks; the map is the
  class token's row (the patch rows' mean under average pooling). Prompt tokens (VPT) are dropped
  from each block's attention and its rows renormalised. Class-agnostic.

The model is used as it is: adapted (after ``apply_peft``) or merged, in eval mode. Adapters only
need to call the modules they wrap, so attention wrappers still deliver their weights to rollout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.data.pipeline import normalize
from peft_jax.errors import UserError
from peft_jax.models.vit import Attention, ViT

METHODS = ("gradcam", "gxi", "ig", "rollout")
# Integrated-gradients steps by default. At 32, IG took 36 of the 57 CPU seconds of explaining 16 images
# of a 224 px EfficientNet-Lite0; a small CNN's largest completeness error is 0.13 at 16 steps, 0.0006 at 256.
IG_STEPS = 16


def unsupported_reason(model: nnx.Module, method: str) -> str | None:
    """Why ``method`` cannot explain ``model`` (None when it can)."""
    name = type(model).__name__
    if method not in METHODS:
        return f"unknown attribution method {method!r}; valid: {', '.join(METHODS)}"
    scanned = isinstance(model, ViT) and model.config.scan_layers
    if method == "gradcam":
        if not (hasattr(model, "feature_map") and hasattr(model, "logits_from_feature_map")):
            return (f"{name} declares no Grad-CAM layer (it needs the methods feature_map and "
                    "logits_from_feature_map; see peft_jax/explain/attribution.py)")
        if scanned:
            return "Grad-CAM on a ViT needs unscanned blocks (model.scan_layers=False)"
    if method == "rollout":
        if not isinstance(model, ViT):
            return f"attention rollout needs a ViT; {name} has no attention maps"
        if scanned or model.config.remat:
            return ("attention rollout needs unscanned, unrematerialised blocks (model.scan_layers=False, "
                    "model.remat=False)")
    return None


def supported_methods(model: nnx.Module) -> list[str]:
    return [m for m in METHODS if unsupported_reason(model, m) is None]


def baseline_image(baseline: str | float, shape: tuple[int, ...]) -> jax.Array:
    """The integrated-gradients baseline in the model's input space: "black" (pixel value 0 through the
    pipeline's normalisation), "mean" (0 after normalisation: the ImageNet mean colour) or a number."""
    if baseline == "black":
        return jnp.broadcast_to(jnp.asarray(normalize(np.zeros((1, 1, 3), np.uint8))), shape)
    if baseline == "mean":
        return jnp.zeros(shape, jnp.float32)
    try:
        return jnp.full(shape, float(baseline), jnp.float32)
    except (TypeError, ValueError):
        raise UserError(f"integrated-gradients baseline must be 'black', 'mean' or a number, got {baseline!r}") \
            from None


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


def _upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def _patch_grid(model: nnx.Module, x: jax.Array, image_size: int) -> jax.Array:
    """(N, h, w, C) from a feature map: a CNN's map as it is, a ViT's patch tokens on their grid."""
    if x.ndim == 4:
        return x
    grid = image_size // model.config.patch_size
    return x[:, -grid * grid:].reshape(x.shape[0], grid, grid, x.shape[-1])


def _gradcam(graphdef, state, images, targets):
    model = nnx.merge(graphdef, state)
    fmap = model.feature_map(images)
    grads = jax.grad(lambda f: _target_logits(model.logits_from_feature_map(f), targets).sum())(fmap)
    fmap, grads = _patch_grid(model, fmap, images.shape[1]), _patch_grid(model, grads, images.shape[1])
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = jax.nn.relu((weights * fmap).sum(axis=-1))
    return _upsample(cam, images.shape[1:3])


def _input_gradient(model: nnx.Module, images: jax.Array, targets: jax.Array) -> jax.Array:
    return jax.grad(lambda x: _target_logits(model(x), targets).sum())(images)


def _gradient_x_input(graphdef, state, images, targets):
    model = nnx.merge(graphdef, state)
    return (_input_gradient(model, images, targets) * images).sum(axis=-1)


def _integrated_gradients(graphdef, state, images, targets, baseline, *, steps: int):
    model = nnx.merge(graphdef, state)
    delta = images - baseline

    def add(total, alpha):
        return total + _input_gradient(model, baseline + alpha * delta, targets), None

    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    total, _ = jax.lax.scan(add, jnp.zeros_like(images), alphas)
    return (delta * total / steps).sum(axis=-1)


def _attention_maps(model: ViT, images: jax.Array) -> list[jax.Array]:
    """Every block's softmax attention weights, in block order."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            module.record_weights = True
    _, captured = nnx.capture(model, nnx.Intermediate)(images)
    found = [(path, var.get_value()) for path, var in nnx.to_flat_state(captured)
             if path[-1] == "attention_weights"]
    found.sort(key=lambda item: [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in item[0]])
    maps = [w for _, values in found for w in values]
    if len(maps) != model.config.depth:
        raise RuntimeError(f"attention rollout captured {len(maps)} attention maps for {model.config.depth} blocks")
    return maps


def _rollout(graphdef, state, images, targets):
    del targets  # rollout does not depend on the class
    model = nnx.merge(graphdef, state)
    prefix, grid = model.config.num_prefix_tokens, images.shape[1] // model.config.patch_size
    rollout = None
    for weights in _attention_maps(model, images):
        a = weights.astype(jnp.float32).mean(axis=1)  # (N, T, T), heads averaged
        keep = np.r_[0:prefix, a.shape[-1] - grid * grid:a.shape[-1]]  # drop prompt tokens
        a = a[:, keep][:, :, keep]
        a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    rows = rollout[:, 0, prefix:] if model.config.pool == "token" else rollout[:, prefix:, prefix:].mean(axis=1)
    return _upsample(rows.reshape(-1, grid, grid), images.shape[1:3])


class Explainer:
    """Jitted attribution functions over one model's state: ``explainer(method, images, targets)``."""

    def __init__(self, model: nnx.Module, *, ig_steps: int = IG_STEPS, baseline: str | float = "black"):
        if int(ig_steps) < 1:
            raise UserError(f"integrated gradients need at least 1 step, got {ig_steps}")
        model.eval()
        self.model = model
        self.baseline = baseline
        self.graphdef, self.state = nnx.split(model)
        self._logits = jax.jit(lambda state, x: nnx.merge(self.graphdef, state)(x))
        kernels = {"gradcam": _gradcam, "gxi": _gradient_x_input, "rollout": _rollout,
                   "ig": functools.partial(_integrated_gradients, steps=int(ig_steps))}
        self._fns = {name: jax.jit(functools.partial(fn, self.graphdef)) for name, fn in kernels.items()}

    def logits(self, images) -> np.ndarray:
        return np.asarray(self._logits(self.state, jnp.asarray(images)))

    def __call__(self, method: str, images, targets) -> np.ndarray:
        reason = unsupported_reason(self.model, method)
        if reason:
            raise UserError(reason)
        images, targets = jnp.asarray(images, jnp.float32), jnp.asarray(targets, jnp.int32)
        args = (self.state, images, targets)
        if method == "ig":
            args += (baseline_image(self.baseline, images.shape),)
        return np.asarray(self._fns[method](*args))
