"""Noise schedules for training (DDPM, Ho et al. 2020) and sampling (DDIM, Song et al. 2021; Euler, Karras et al.
2022), with classifier-free guidance (Ho & Salimans 2022).

Everything is a function of arrays: a sampler holds its per-step tables as numpy arrays and
``step(model_output, i, sample)`` takes the step index ``i`` (a Python int or a traced
integer), so a whole sampling loop can be jitted. Numbers follow the diffusers
``scheduler_config.json`` fields, so a pipeline folder's scheduler is reproduced exactly.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers ``scheduler/scheduler_config.json`` (defaults: SD 1.x)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear", "scaled_linear" or "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # or "v_prediction" (SD 2.x 768 px)
    timestep_spacing: str = "leading"  # "leading", "trailing" or "linspace"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM: the alpha-bar after the last step (1, or that of t=0)
    clip_sample: bool = False  # DDIM: clip the predicted clean sample to [-clip_sample_range, +range]
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise UserError(f"timestep_spacing must be leading, trailing or linspace, got {self.timestep_spacing!r}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "SchedulerConfig":
        """From a diffusers scheduler config; options this module does not implement are refused, not ignored."""
        for key, neutral in (("rescale_betas_zero_snr", False), ("thresholding", False), ("use_karras_sigmas", False),
                             ("trained_betas", None), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                             ("timestep_type", "discrete"), ("final_sigmas_type", "zero"),
                             ("interpolation_type", "linear")):
            if config.get(key) not in (neutral, None):
                raise UserError(f"scheduler option {key}={config[key]!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), (num_train_timesteps,) float32 (computed in float64)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    else:
        raise UserError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    return np.cumprod(1.0 - betas).astype(np.float32)


def _coefficients(cfg: SchedulerConfig, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t), shaped to broadcast against ``like`` (batch first)."""
    abar = jnp.asarray(alphas_cumprod(cfg))[jnp.asarray(t)]
    shape = abar.shape + (1,) * (like.ndim - abar.ndim)
    return jnp.sqrt(abar).reshape(shape), jnp.sqrt(1.0 - abar).reshape(shape)


def add_noise(cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The forward process q(x_t | x_0): sqrt(abar) x0 + sqrt(1 - abar) noise."""
    a, s = _coefficients(cfg, t, x0)
    return a * x0 + s * noise


def velocity(cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar) noise - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    a, s = _coefficients(cfg, t, x0)
    return a * noise - s * x0


def training_target(cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the U-Net learns to predict under ``prediction_type``."""
    return noise if cfg.prediction_type == "epsilon" else velocity(cfg, x0, noise, t)


def _spaced_timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    n = cfg.num_train_timesteps
    if not 0 < num_steps <= n:
        raise UserError(f"num_inference_steps must be in [1, {n}], got {num_steps}")
    if cfg.timestep_spacing == "leading":
        return (np.arange(num_steps) * (n // num_steps)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.arange(n, 0, -n / num_steps).round() - 1
    return np.linspace(0, n - 1, num_steps)[::-1]


class DDIMSampler:
    """Deterministic DDIM (eta = 0)."""

    init_noise_sigma = 1.0

    def __init__(self, cfg: SchedulerConfig, num_inference_steps: int):
        self.config = cfg
        abar = alphas_cumprod(cfg)
        t = _spaced_timesteps(cfg, num_inference_steps).round().astype(np.int64)
        self.timesteps = t
        prev = t - cfg.num_train_timesteps // num_inference_steps
        final = 1.0 if cfg.set_alpha_to_one else abar[0]
        self.abar = abar[t]
        self.abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final).astype(np.float32)

    def scale_input(self, sample: jax.Array, i) -> jax.Array:
        del i
        return sample

    def step(self, model_output: jax.Array, i, sample: jax.Array) -> jax.Array:
        a_t, a_prev = jnp.asarray(self.abar)[i], jnp.asarray(self.abar_prev)[i]
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        if self.config.prediction_type == "epsilon":
            x0 = (x - jnp.sqrt(1 - a_t) * out) / jnp.sqrt(a_t)
            eps = out
        else:
            x0 = jnp.sqrt(a_t) * x - jnp.sqrt(1 - a_t) * out
            eps = jnp.sqrt(a_t) * out + jnp.sqrt(1 - a_t) * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = jnp.clip(x0, -r, r)
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps


class EulerSampler:
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - abar) / abar) (no churn)."""

    def __init__(self, cfg: SchedulerConfig, num_inference_steps: int):
        self.config = cfg
        abar = alphas_cumprod(cfg).astype(np.float64)
        t = _spaced_timesteps(cfg, num_inference_steps).astype(np.float32)
        self.timesteps = t
        all_sigmas = np.sqrt((1 - abar) / abar)
        sigmas = np.interp(t, np.arange(len(all_sigmas)), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)

    def scale_input(self, sample: jax.Array, i) -> jax.Array:
        sigma = jnp.asarray(self.sigmas)[i]
        return sample / jnp.sqrt(sigma**2 + 1)

    def step(self, model_output: jax.Array, i, sample: jax.Array) -> jax.Array:
        sigmas = jnp.asarray(self.sigmas)
        sigma, nxt = sigmas[i], sigmas[i + 1]
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        return x + (x - x0) / sigma * (nxt - sigma)


SAMPLERS = {"ddim": DDIMSampler, "euler": EulerSampler}


def make_sampler(name: str, cfg: SchedulerConfig, num_inference_steps: int) -> DDIMSampler | EulerSampler:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name](cfg, num_inference_steps)


def guided(denoise: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x: jax.Array, t: jax.Array,
           cond: jax.Array, uncond: jax.Array | None, guidance_scale: float) -> jax.Array:
    """Classifier-free guidance: uncond + s (cond - uncond), with both halves in one batch."""
    if uncond is None or guidance_scale == 1.0:
        return denoise(x, t, cond)
    out_uncond, out_cond = jnp.split(denoise(jnp.concatenate([x, x]), t, jnp.concatenate([uncond, cond])), 2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def sample(denoise: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], sampler: DDIMSampler | EulerSampler,
           cond: jax.Array, uncond: jax.Array | None, *, shape: tuple[int, ...], key: jax.Array,
           guidance_scale: float = 7.5) -> jax.Array:
    """Latents (NHWC) from noise by running ``sampler`` with ``denoise(x, t, context)`` (a U-Net call).

    Pure in its array arguments (a ``jax.lax.fori_loop``), so it can be wrapped in ``jax.jit``.
    """
    x = jax.random.normal(key, shape, jnp.float32) * sampler.init_noise_sigma
    timesteps = jnp.asarray(sampler.timesteps)

    def body(i, x):
        t = timesteps[i]
        out = guided(denoise, sampler.scale_input(x, i), t, cond, uncond, guidance_scale)
        return sampler.step(out, i, x)

    return jax.lax.fori_loop(0, len(sampler.timesteps), body, x)
