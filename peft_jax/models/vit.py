"""Vision Transformer (Dosovitskiy et al. 2021) as a plain Flax NNX module.

The module tree mirrors google-research/vision_transformer and timm so that every
public checkpoint maps onto it key by key, and PEFT surgery finds layers by stable
names (``blocks/3/attn/query``). The model knows nothing about PEFT.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from peft_jax.errors import UserError
from peft_jax.models.precision import mixed_einsum

Dtype = jnp.dtype


# model.remat_policy -> what ``jax.checkpoint`` keeps of a block for the backward pass; the rest is recomputed
# there. nothing_saveable (also what an unset policy means) is jax.checkpoint without a policy: the whole block.
# projections_saveable keeps the outputs Attention and Mlp tag with ``checkpoint_name`` (q/k/v, attention out,
# MLP hidden pre-activation); from them the backward pass recomputes the norms, attention scores, softmax, GELU
# and adapter products, and a frozen linear needs nothing more.
SAVED_NAMES = ("attn_qkv", "attn_out", "mlp_hidden")
REMAT_POLICIES = {
    "nothing_saveable": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "projections_saveable": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}


class LayerShared(nnx.Param):
    """A parameter that every block uses (e.g. factors shared across layers): a scanned
    model keeps it unstacked and hands the same value to every step of the scan."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pool: str = "token"  # "token" (class token) or "gap" (global average of patch tokens)
    class_token: bool | None = None  # None: a class token exactly when pool == "token"
    fc_norm: bool = False  # final LayerNorm after pooling instead of before (timm's fc_norm)
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False  # Google's original ViT code uses the tanh approximation
    scan_layers: bool = False  # stack the blocks and run them with a scan (fast compiles for L/H)
    remat: bool = False  # recompute block activations in the backward pass (memory for L/H)
    remat_policy: str | None = None  # with remat: a REMAT_POLICIES name (None: recompute the whole block)
    dtype: str = "float32"  # computation dtype; parameters stay float32
    # Operands of the linear and attention products (None: ``dtype``). "bfloat16" with float32
    # activations: bf16 products that accumulate in float32, every other operation in float32.
    matmul_dtype: str | None = None

    def __post_init__(self):
        # A smaller image trains on the class token alone; a remainder is silently cropped away.
        if self.patch_size < 1 or self.image_size < self.patch_size or self.image_size % self.patch_size:
            p = max(1, self.patch_size)
            near = sorted({max(p, self.image_size // p * p), max(p, -(-self.image_size // p) * p)})
            raise UserError(f"model.image_size={self.image_size} must be a positive multiple of model.patch_size="
                             f"{self.patch_size} (at least one patch); the nearest valid sizes are "
                             f"{' and '.join(map(str, near))}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"model.remat_policy must be unset (recompute the whole block) or one of "
                            f"{', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.remat_policy is not None and not self.remat:  # a policy alone would change nothing, silently
            raise UserError(f"model.remat_policy={self.remat_policy} needs model.remat=True (or unset the policy)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def has_class_token(self) -> bool:
        return self.pool == "token" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.has_class_token else 0


# Widths, depths and heads of the published models (Dosovitskiy et al., Steiner et al.).
VIT_VARIANTS: dict[str, dict] = {
    "vit_ti16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "vit_s16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_b32": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_l16": dict(patch_size=16, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "vit_h14": dict(patch_size=14, hidden_size=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def bf16_products(x: jax.Array, matmul_dtype: Dtype) -> bool:
    """Whether a product on ``x`` takes bf16 operands (``precision.mixed_einsum``)."""
    return x.dtype == jnp.bfloat16 or matmul_dtype == jnp.bfloat16


class Dense(nnx.Linear):
    """``nnx.Linear`` whose bfloat16 products accumulate in float32, forward and backward
    (``precision.mixed_einsum``): with bf16 inputs, or with ``matmul_dtype`` bf16 on float32
    inputs. The output keeps the input's dtype."""

    def __init__(self, *args, matmul_dtype: Dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_dtype = matmul_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if not bf16_products(x, self.matmul_dtype):
            return super().__call__(x)
        y = mixed_einsum("...k,kn->...n", x, self.kernel[...]).astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def _dense(din: int, dout: int, rngs: nnx.Rngs, dtype: Dtype, matmul_dtype: Dtype) -> Dense:
    return Dense(
        din, dout, dtype=dtype, rngs=rngs, matmul_dtype=matmul_dtype,
        kernel_init=nnx.initializers.xavier_uniform(),
        bias_init=nnx.initializers.normal(1e-6),
    )


class Attention(nnx.Module):
    """Multi-head self-attention with separate query/key/value/out projections."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype: Dtype, matmul_dtype: Dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.matmul_dtype = matmul_dtype
        self.query = _dense(hidden_size, hidden_size, rngs, dtype, matmul_dtype)
        self.key = _dense(hidden_size, hidden_size, rngs, dtype, matmul_dtype)
        self.value = _dense(hidden_size, hidden_size, rngs, dtype, matmul_dtype)
        self.out = _dense(hidden_size, hidden_size, rngs, dtype, matmul_dtype)
        # True only while an explanation captures the weights (``nnx.capture(model, nnx.Intermediate)``,
        # peft_jax/explain): then every call sows its (N, heads, queries, keys) softmax weights.
        self.record_weights = False

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(b, t.shape[1], h, d // h)

        def project(dense):  # tagged for model.remat_policy=projections_saveable
            return heads(checkpoint_name(dense(x), "attn_qkv"))

        q, k, v = project(self.query), project(self.key), project(self.value)
        # Einsum attention measured faster than jax.nn.dot_product_attention on XLA:CPU.
        einsum = mixed_einsum if bf16_products(x, self.matmul_dtype) else jnp.einsum
        logits = einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        if self.record_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        y = einsum("bhqk,bkhd->bqhd", weights, v).astype(x.dtype).reshape(b, -1, d)
        return checkpoint_name(self.out(y), "attn_out")


class Mlp(nnx.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, approximate: bool, *, dtype: Dtype, matmul_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.approximate = approximate
        self.fc1 = _dense(hidden_size, mlp_dim, rngs, dtype, matmul_dtype)
        self.fc2 = _dense(mlp_dim, hidden_size, rngs, dtype, matmul_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(checkpoint_name(self.fc1(x), "mlp_hidden"), approximate=self.approximate))


class Block(nnx.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        matmul_dtype = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
        self.norm1 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, dtype=dtype, matmul_dtype=matmul_dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_dim, cfg.gelu_approximate, dtype=dtype, matmul_dtype=matmul_dtype,
                       rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pos_embed: jax.Array, new_grid: int, num_prefix_tokens: int) -> jax.Array:
    """Bilinearly resamples the patch part of a (1, prefix + g*g, D) position embedding.

    Lets a checkpoint trained at one resolution run at another (Dosovitskiy et al. 2021, 3.2).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(math.sqrt(grid.shape[1])))
    if old * old != grid.shape[1]:
        raise UserError(f"position embedding with {grid.shape[1]} patch tokens is not a square grid")
    if old == new_grid:
        return pos_embed
    d = grid.shape[-1]
    grid = jax.image.resize(grid.reshape(1, old, old, d), (1, new_grid, new_grid, d), method="bilinear")
    return jnp.concatenate([prefix, grid.reshape(1, new_grid * new_grid, d).astype(pos_embed.dtype)], axis=1)


class ViT(nnx.Module):
    """ViT classifier: ``model(images)`` maps NHWC float images to logits."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        self.num_features = d
        self.num_classes = cfg.num_classes
        self.patch_embed = nnx.Conv(
            3, d, kernel_size=(cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID", dtype=dtype, rngs=rngs,
            kernel_init=nnx.initializers.lecun_normal(),
        )
        if cfg.pool not in ("token", "gap"):
            raise UserError(f"model.pool must be 'token' or 'gap', got {cfg.pool!r}")
        if cfg.pool == "token" and not cfg.has_class_token:
            raise UserError("model.pool='token' needs a class token (class_token=False was given)")
        if cfg.has_class_token:
            self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        num_tokens = cfg.grid_size**2 + cfg.num_prefix_tokens
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num_tokens, d), jnp.float32))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        # Extension point for tokens that travel through every block without a position
        # embedding (VPT-shallow sets it): ``insert(x, prefix)`` before the first block,
        # ``remove(x, prefix)`` after the last. A slot, so that a scanned model can have it too.
        self.extra_tokens = nnx.data(None)
        self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d, cfg.num_classes, dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens plus class token and position embedding: (N, tokens, D)."""
        x = self.patch_embed(images.astype(jnp.dtype(self.config.dtype)))
        b, gh, gw, d = x.shape
        if gh != gw:
            raise ValueError(f"ViT expects square inputs, got a {gh}x{gw} patch grid")
        x = x.reshape(b, gh * gw, d)
        if self.config.has_class_token:
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = resize_pos_embed(self.pos_embed[...], gh, self.config.num_prefix_tokens)
        return x + pos.astype(x.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        """Runs the transformer blocks over a token sequence."""
        if self.config.scan_layers:
            # A plain lax.scan over the stacked block state (a pure jax transform nests under
            # any outer one). LayerShared parameters are not stacked: every step closes over the
            # same value. The only state a block changes is the per-layer count of a dropout
            # stream, which the scan returns and writes back.
            graph, shared, counts, stacked = nnx.split(self.blocks, LayerShared, nnx.RngCount, ...)

            def body(x, layer):
                block = nnx.merge(graph, shared, *layer)
                return block(x), nnx.state(block, nnx.RngCount)

            if self.config.remat:
                body = self._checkpoint(body, scanned=True)
            x, counts = jax.lax.scan(body, x, (counts, stacked))
            nnx.update(self.blocks, counts)
            return x
        return self._run_blocks(x, self.blocks)

    def _run_blocks(self, x: jax.Array, blocks) -> jax.Array:
        for block in blocks:
            if self.config.remat:  # recompute the block in the backward pass instead of storing it
                graph, state = nnx.split(block)
                x = self._checkpoint(lambda s, t, graph=graph: nnx.merge(graph, s)(t), scanned=False)(state, x)
            else:
                x = block(x)
        return x

    def _checkpoint(self, fn, *, scanned: bool):
        """``fn`` (a block) under ``jax.checkpoint`` with ``model.remat_policy``'s policy.

        Unrolled blocks under a policy need ``prevent_cse``: without it XLA merges the recomputed operations
        with the forward pass's and keeps their outputs after all (ViT-B/16 LoRA, projections_saveable, the
        concurrency scheduler off: temp 1.41 GB instead of 0.67). A scan keeps them apart by itself; the
        whole-block remat measured about the same either way (0.24 GB without it, 0.22 with it) and keeps the
        program it had before policies existed.
        """
        policy = REMAT_POLICIES[self.config.remat_policy or "nothing_saveable"]
        return jax.checkpoint(fn, prevent_cse=policy is not None and not scanned, policy=policy)

    def tokens(self, images: jax.Array) -> jax.Array:
        """The sequence the first block takes: embedded tokens with any extra (prompt) tokens inserted."""
        x = self.embed(images)
        if self.extra_tokens is not None:
            x = self.extra_tokens.insert(x, self.config.num_prefix_tokens)
        return x

    def pooled(self, x: jax.Array) -> jax.Array:
        """Pooled, normalised pre-head features (N, D) of the last block's output tokens."""
        prefix = self.config.num_prefix_tokens
        if self.extra_tokens is not None:
            x = self.extra_tokens.remove(x, prefix)
        if not self.config.fc_norm:
            x = self.norm(x)
        pooled = x[:, 0] if self.config.pool == "token" else x[:, prefix:].mean(axis=1)
        return self.norm(pooled) if self.config.fc_norm else pooled

    def features(self, images: jax.Array) -> jax.Array:
        """Pooled, normalised pre-head features (N, D)."""
        return self.pooled(self.encode(self.tokens(images)))

    def feature_map(self, images: jax.Array) -> jax.Array:
        """The tokens entering the last block, (N, tokens, D), patch tokens last: Grad-CAM's layer.

        Not the last block's output: with class-token pooling its patch tokens never reach the logits.
        """
        if self.config.scan_layers:
            raise ValueError("feature_map needs unscanned blocks (model.scan_layers=False): a scanned ViT runs "
                             "all its blocks in one scan")
        return self._run_blocks(self.tokens(images), list(self.blocks)[:-1])

    def logits_from_feature_map(self, x: jax.Array) -> jax.Array:
        """The rest of the forward pass: ``model(images) == logits_from_feature_map(feature_map(images))``."""
        return self.head(self.pooled(self._run_blocks(x, list(self.blocks)[-1:]))).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images)).astype(jnp.float32)
