"""The Stable Diffusion autoencoder (``AutoencoderKL``, Rombach et al. 2022) as a plain Flax NNX module (NHWC).

``encode(images)`` gives the mean and log-variance of the latent Gaussian; latents for the
U-Net are ``sample * scaling_factor`` (0.18215 for SD 1.x/2.x), and ``decode`` expects them
divided back. Images are in [-1, 1]. The module tree mirrors the diffusers checkpoints.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.models.diffusion.layers import Downsample2D, ResnetBlock2D, Upsample2D, attention, conv, group_norm, linear

Dtype = jnp.dtype
EPS = 1e-6  # every norm of the SD autoencoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``vae/config.json`` (defaults: SD 1.x/2.x)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.group_norm = group_norm(channels, groups, EPS, dtype=dtype, rngs=rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = (
            linear(channels, channels, dtype=dtype, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        y = self.to_out(attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1))
        return x + y.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, cfg: VAEConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        groups = cfg.norm_num_groups
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups=groups, eps=EPS, dtype=dtype,
                                               rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List(
            [AttentionBlock(channels, groups, dtype=dtype, rngs=rngs)] if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, *, add_downsample: bool, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups=groups, eps=EPS,
                                               dtype=dtype, rngs=rngs) for j in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, *, add_upsample: bool, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups=groups, eps=EPS,
                                               dtype=dtype, rngs=rngs) for j in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        ch, n, groups = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, add_downsample=i < n - 1,
                         dtype=dtype, rngs=rngs) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], groups, EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        rev, n, groups = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(rev[0], cfg, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, add_upsample=i < n - 1,
                         dtype=dtype, rngs=rngs) for i in range(n)])
        self.conv_norm_out = group_norm(rev[-1], groups, EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """KL-regularised autoencoder: ``encode`` -> (mean, logvar), ``decode`` latents -> images, NHWC."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = jnp.dtype(cfg.dtype)
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = conv(2 * lat, 2 * lat, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, dtype=dtype, rngs=rngs) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and log-variance (clipped to [-30, 20] as in the reference) of the latent Gaussian."""
        moments = self.encoder(images.astype(jnp.dtype(self.config.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """U-Net-ready latents: a posterior sample (the mean when ``key`` is None), shifted and scaled."""
        mean, logvar = self.encode(images)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode(self, z: jax.Array) -> jax.Array:
        """Images from raw (unscaled) latents."""
        z = z.astype(jnp.dtype(self.config.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Images from U-Net latents (undoes the scaling of ``latents``)."""
        return self.decode(latents / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images)[0])
