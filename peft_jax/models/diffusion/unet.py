"""The Stable Diffusion U-Net (``UNet2DConditionModel``, Rombach et al. 2022) as a plain Flax NNX module.

Called as ``unet(latents_nhwc, timesteps, encoder_hidden_states)`` and returns the NHWC
prediction (noise or velocity). The module tree mirrors the diffusers checkpoints
(``down_blocks/0/attentions/1/transformer_blocks/0/attn2/to_k``), with two renames:
``to_out.0`` is ``to_out`` and the GEGLU feed-forward ``ff.net.0.proj`` / ``ff.net.2`` is
``ff/proj`` / ``ff/out``. The model knows nothing about PEFT.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.errors import UserError
from peft_jax.models.diffusion.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm, linear

Dtype = jnp.dtype
PerBlock = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``unet/config.json`` that Stable Diffusion 1.x/2.x use (defaults: SD 1.5)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_dim: PerBlock = 768
    # diffusers' (historically misnamed) field: the number of heads when num_attention_heads is unset.
    attention_head_dim: PerBlock = 8
    num_attention_heads: PerBlock | None = None
    transformer_layers_per_block: PerBlock = 1
    use_linear_projection: bool = False  # SD 2.x: linear proj_in/proj_out instead of 1x1 convs
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    remat: bool = False  # recompute each block's activations in the backward pass (memory at 512 px)
    dtype: str = "float32"  # computation dtype; parameters stay float32

    def per_block(self, value: PerBlock | None) -> tuple[int, ...]:
        n = len(self.down_block_types)
        value = self.attention_head_dim if value is None else value
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
        if len(values) != n:
            raise UserError(f"UNet: {values} has {len(values)} entries for {n} down blocks")
        return values

    @property
    def heads(self) -> tuple[int, ...]:
        return self.per_block(self.num_attention_heads)

    def __post_init__(self):
        n = len(self.down_block_types)
        if len(self.block_out_channels) != n or len(self.up_block_types) != n:
            raise UserError(f"UNet: {n} down blocks, {len(self.up_block_types)} up blocks and "
                             f"{len(self.block_out_channels)} block_out_channels must agree")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise UserError(f"UNet: unsupported down block {t!r}")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise UserError(f"UNet: unsupported up block {t!r}")


# Published configurations (diffusers unet/config.json of each pipeline).
UNET_VARIANTS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd21": UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True),
    "sd21_base": UNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps (Vaswani et al. 2017), (B, dim) float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(cin, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    """Feed-forward ``out(h * gelu(g))`` with ``h, g = proj(x)`` (Shazeer 2020), 4x inner width."""

    def __init__(self, dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = linear(dim, 8 * dim, dtype=dtype, rngs=rngs)
        self.out = linear(4 * dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention to the text, and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, None, heads, dim // heads, qkv_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads, qkv_bias=False, dtype=dtype, rngs=rngs)
        self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.ff = GEGLU(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, projection to tokens, transformer blocks, projection back, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, num_layers: int, cfg: UNetConfig, *,
                 dtype: Dtype, rngs: nnx.Rngs):
        if channels % heads:
            raise UserError(f"UNet: {channels} channels do not split into {heads} attention heads")
        self.linear = cfg.use_linear_projection
        self.norm = group_norm(channels, cfg.norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        if self.linear:
            self.proj_in = linear(channels, channels, dtype=dtype, rngs=rngs)
            self.proj_out = linear(channels, channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
            self.proj_out = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, context_dim, dtype=dtype, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        # proj_in / proj_out act per pixel: as 1x1 convs (SD 1.x) or linears (SD 2.x) they are the same map.
        y = self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        return self.proj_out(y.reshape(b, h, w, c)) + x


class DownBlock(nnx.Module):
    """ResNet blocks (each followed by a transformer when ``cross_attention``), then a stride-2 conv."""

    def __init__(self, cin: int, cout: int, temb: int, i: int, cfg: UNetConfig, *, cross_attention: bool,
                 add_downsample: bool, dtype: Dtype, rngs: nnx.Rngs):
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, temb, groups=cfg.norm_num_groups,
                                               eps=cfg.norm_eps, dtype=dtype, rngs=rngs) for j in range(n)])
        self.attentions = nnx.List([
            Transformer2DModel(cout, cfg.heads[i], cfg.per_block(cfg.cross_attention_dim)[i],
                               cfg.per_block(cfg.transformer_layers_per_block)[i], cfg, dtype=dtype, rngs=rngs)
            for _ in range(n if cross_attention else 0)])
        self.downsamplers = nnx.List(
            [Downsample2D(cout, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)] if add_downsample else [])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """ResNet, (transformer, ResNet) at the lowest resolution."""

    def __init__(self, channels: int, temb: int, cfg: UNetConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor,
                  dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb, **kw) for _ in range(2)])
        self.attentions = nnx.List([
            Transformer2DModel(channels, cfg.heads[-1], cfg.per_block(cfg.cross_attention_dim)[-1],
                               cfg.per_block(cfg.transformer_layers_per_block)[-1], cfg, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nnx.Module):
    """ResNet blocks on the input concatenated with the matching down-path output (optionally with
    transformers), then nearest 2x and a conv."""

    def __init__(self, cin: int, cprev: int, cout: int, temb: int, i: int, cfg: UNetConfig, *, cross_attention: bool,
                 add_upsample: bool, dtype: Dtype, rngs: nnx.Rngs):
        n = cfg.layers_per_block + 1
        heads = cfg.heads[::-1][i]
        context_dim = cfg.per_block(cfg.cross_attention_dim)[::-1][i]
        layers = cfg.per_block(cfg.transformer_layers_per_block)[::-1][i]
        self.resnets = nnx.List([
            ResnetBlock2D((cprev if j == 0 else cout) + (cin if j == n - 1 else cout), cout, temb,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, rngs=rngs) for j in range(n)])
        self.attentions = nnx.List([Transformer2DModel(cout, heads, context_dim, layers, cfg, dtype=dtype, rngs=rngs)
                                    for _ in range(n if cross_attention else 0)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1), temb)
            if self.attentions:
                x = self.attentions[j](x, context)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNet2DConditionModel(nnx.Module):
    """Noise (or velocity) prediction ``unet(latents_nhwc, timesteps, encoder_hidden_states)`` -> NHWC."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = jnp.dtype(cfg.dtype)
        ch = cfg.block_out_channels
        temb = 4 * ch[0]
        n = len(ch)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], temb, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], temb, i, cfg, cross_attention=t == "CrossAttnDownBlock2D",
                      add_downsample=i < n - 1, dtype=dtype, rngs=rngs)
            for i, t in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], temb, cfg, dtype=dtype, rngs=rngs)
        rev = ch[::-1]
        self.up_blocks = nnx.List([
            UpBlock(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb, i, cfg,
                    cross_attention=t == "CrossAttnUpBlock2D", add_upsample=i < n - 1, dtype=dtype, rngs=rngs)
            for i, t in enumerate(cfg.up_block_types)])
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, h, w, _ = sample.shape
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if h % factor or w % factor:
            raise UserError(f"UNet: latent size {h}x{w} must be a multiple of {factor}")
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
        temb = self.time_embedding(emb.astype(dtype))
        context = encoder_hidden_states.astype(dtype)

        def run(block, *args):
            return nnx.remat(lambda m, *a: m(*a))(block, *args) if cfg.remat else block(*args)

        x = self.conv_in(sample.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, states = run(block, x, temb, context)
            skips += states
        x = run(self.mid_block, x, temb, context)
        for block in self.up_blocks:
            k = len(block.resnets)
            x = run(block, x, skips[-k:], temb, context)
            skips = skips[:-k]
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x))).astype(jnp.float32)
