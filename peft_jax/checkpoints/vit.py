"""ViT weights from Google ``.npz``, timm state dicts and Hugging Face transformers.

Each converter walks our block structure and maps the source names onto
``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks/i/{norm1,attn,norm2,mlp}``,
``norm`` and ``head``. The three sources also differ in numerics that shapes do not
show (LayerNorm epsilon, exact or tanh GELU); `numerics` gives each format's own.
"""
from __future__ import annotations

import logging

import numpy as np

from peft_jax.checkpoints.core import CheckpointError, KeyMapper, torch_conv, torch_linear
from peft_jax.checkpoints.formats import Checkpoint
from peft_jax.models.vit import ViTConfig

log = logging.getLogger("peft_jax.checkpoints")

# transformers hidden_act -> gelu_approximate
HF_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def _hf_prefix(m: KeyMapper) -> str:
    return "vit." if m.has("vit.embeddings.patch_embeddings.projection.weight") else ""


def numerics(ckpt: Checkpoint) -> dict:
    """ViTConfig fields that the checkpoint's format fixes but its shapes do not show."""
    a = ckpt.arrays
    if ckpt.layout == "google_vit":  # vit_jax: flax LayerNorm(1e-6) and flax's default tanh GELU
        return dict(layer_norm_eps=1e-6, gelu_approximate=True, pool="token" if "cls" in a else "gap")
    if ckpt.layout == "timm_vit":
        # timm's fc_norm (a LayerNorm after average pooling, e.g. MAE fine-tunes) implies global_pool="avg",
        # which averages the patch tokens after the class token when there is one.
        fc_norm = "fc_norm.weight" in a
        return dict(layer_norm_eps=1e-6, gelu_approximate=False, class_token="cls_token" in a, fc_norm=fc_norm,
                    pool="token" if "cls_token" in a and not fc_norm else "gap")
    config = ckpt.hf_config or {}  # a bare transformers state dict has the transformers defaults
    act = config.get("hidden_act", "gelu")
    if act not in HF_GELU:
        raise CheckpointError(f"{ckpt.path}: hidden_act={act!r} is not supported (supported: {sorted(HF_GELU)})")
    return dict(layer_norm_eps=config.get("layer_norm_eps", 1e-12), gelu_approximate=HF_GELU[act], pool="token")


def check_hf_config(where: str, config: dict, cfg: ViTConfig) -> None:
    """Refuses a transformers ViT whose config.json describes another network than `cfg`."""
    want = {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim, "patch_size": cfg.patch_size, "num_channels": 3, "qkv_bias": True,
    }
    bad = [f"{k}={config[k]!r} (model: {v!r})" for k, v in want.items() if k in config and config[k] != v]
    if bad:
        raise CheckpointError(f"{where}: config.json does not describe the requested ViT: " + ", ".join(bad))


def check_google_heads(where: str, arrays: dict, num_heads: int) -> None:
    """Google kernels keep the head axis, (D, heads, head_dim): a head count mismatch is caught here."""
    q = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if q is not None and q.ndim == 3 and q.shape[1] != num_heads:
        raise CheckpointError(f"{where}: checkpoint has {q.shape[1]} attention heads, model {num_heads}")


def _norm(m: KeyMapper, target: tuple, weight: str, bias: str) -> None:
    m.map((*target, "scale"), weight)
    m.map((*target, "bias"), bias)


def _linear(m: KeyMapper, target: tuple, prefix: str) -> None:
    m.map((*target, "kernel"), f"{prefix}.weight", torch_linear)
    m.map((*target, "bias"), f"{prefix}.bias")


def convert_hf(m: KeyMapper, depth: int) -> bool:
    """transformers ViTForImageClassification / ViTModel on-disk names. Returns whether a head is usable."""
    p = _hf_prefix(m)
    m.map(("patch_embed", "kernel"), f"{p}embeddings.patch_embeddings.projection.weight", torch_conv)
    m.map(("patch_embed", "bias"), f"{p}embeddings.patch_embeddings.projection.bias")
    m.map(("cls_token",), f"{p}embeddings.cls_token")
    m.map(("pos_embed",), f"{p}embeddings.position_embeddings")
    for i in range(depth):
        src, blk = f"{p}encoder.layer.{i}", ("blocks", i)
        _norm(m, (*blk, "norm1"), f"{src}.layernorm_before.weight", f"{src}.layernorm_before.bias")
        for name in ("query", "key", "value"):
            _linear(m, (*blk, "attn", name), f"{src}.attention.attention.{name}")
        _linear(m, (*blk, "attn", "out"), f"{src}.attention.output.dense")
        _norm(m, (*blk, "norm2"), f"{src}.layernorm_after.weight", f"{src}.layernorm_after.bias")
        _linear(m, (*blk, "mlp", "fc1"), f"{src}.intermediate.dense")
        _linear(m, (*blk, "mlp", "fc2"), f"{src}.output.dense")
    _norm(m, ("norm",), f"{p}layernorm.weight", f"{p}layernorm.bias")
    if m.has(f"{p}pooler.dense.weight"):  # ViTModel's tanh pooler: not part of a ViT classifier
        log.info("dropping the transformers ViTModel pooler (pooler.dense), unused by the classifier")
        m.drop(f"{p}pooler.dense.weight")
        m.drop(f"{p}pooler.dense.bias")
    if m.has("classifier.weight") or m.has("classifier.bias"):
        _linear(m, ("head",), "classifier")
    return True


def convert_timm(m: KeyMapper, depth: int) -> bool:
    """timm VisionTransformer names, with the fused qkv projection split into query/key/value."""
    m.map(("patch_embed", "kernel"), "patch_embed.proj.weight", torch_conv)
    m.map(("patch_embed", "bias"), "patch_embed.proj.bias")
    if m.has("cls_token"):
        m.map(("cls_token",), "cls_token")
    m.map(("pos_embed",), "pos_embed")
    for i in range(depth):
        src, blk = f"blocks.{i}", ("blocks", i)
        _norm(m, (*blk, "norm1"), f"{src}.norm1.weight", f"{src}.norm1.bias")
        for j, name in enumerate(("query", "key", "value")):
            # qkv.weight is (3D, D): rows [0, D) are the query, then key, then value.
            m.map((*blk, "attn", name, "kernel"), f"{src}.attn.qkv.weight", lambda w, j=j: np.split(w, 3)[j].T)
            m.map((*blk, "attn", name, "bias"), f"{src}.attn.qkv.bias", lambda b, j=j: np.split(b, 3)[j])
        _linear(m, (*blk, "attn", "out"), f"{src}.attn.proj")
        _norm(m, (*blk, "norm2"), f"{src}.norm2.weight", f"{src}.norm2.bias")
        _linear(m, (*blk, "mlp", "fc1"), f"{src}.mlp.fc1")
        _linear(m, (*blk, "mlp", "fc2"), f"{src}.mlp.fc2")
    final = "fc_norm" if m.has("fc_norm.weight") else "norm"  # after or before pooling (ViTConfig.fc_norm)
    _norm(m, ("norm",), f"{final}.weight", f"{final}.bias")
    if m.has("head.weight") or m.has("head.bias"):
        _linear(m, ("head",), "head")
    return True


def convert_google(m: KeyMapper, depth: int) -> bool:
    """google-research/vision_transformer names. Returns False when the head needs a pre-logits layer."""
    m.map(("patch_embed", "kernel"), "embedding/kernel")  # already HWIO
    m.map(("patch_embed", "bias"), "embedding/bias")
    if m.has("cls"):
        m.map(("cls_token",), "cls")
    m.map(("pos_embed",), "Transformer/posembed_input/pos_embedding")
    for i in range(depth):
        src, blk = f"Transformer/encoderblock_{i}", ("blocks", i)
        att = f"{src}/MultiHeadDotProductAttention_1"
        _norm(m, (*blk, "norm1"), f"{src}/LayerNorm_0/scale", f"{src}/LayerNorm_0/bias")
        for name in ("query", "key", "value"):
            # (D, heads, head_dim) -> (D, D), heads major as in the model's reshape
            m.map((*blk, "attn", name, "kernel"), f"{att}/{name}/kernel", lambda k: k.reshape(k.shape[0], -1))
            m.map((*blk, "attn", name, "bias"), f"{att}/{name}/bias", lambda b: b.reshape(-1))
        m.map((*blk, "attn", "out", "kernel"), f"{att}/out/kernel", lambda k: k.reshape(-1, k.shape[-1]))
        m.map((*blk, "attn", "out", "bias"), f"{att}/out/bias")
        _norm(m, (*blk, "norm2"), f"{src}/LayerNorm_2/scale", f"{src}/LayerNorm_2/bias")
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            m.map((*blk, "mlp", fc, "kernel"), f"{src}/MlpBlock_3/{dense}/kernel")
            m.map((*blk, "mlp", fc, "bias"), f"{src}/MlpBlock_3/{dense}/bias")
    _norm(m, ("norm",), "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias")
    if m.has("head/kernel") or m.has("head/bias"):
        m.map(("head", "kernel"), "head/kernel")
        m.map(("head", "bias"), "head/bias")
    if m.has("pre_logits/kernel"):
        # The original i21k files have a tanh representation layer before the head; like
        # vision_transformer's own fine-tuning, it is dropped together with that head.
        log.info("dropping the pre-logits (representation) layer of the Google checkpoint")
        m.drop("pre_logits/kernel")
        m.drop("pre_logits/bias")
        return False
    return True


CONVERTERS = {"hf_vit": convert_hf, "timm_vit": convert_timm, "google_vit": convert_google}


def native_image_size(converted: dict, hf_config: dict | None, num_prefix_tokens: int) -> int | None:
    """The resolution the checkpoint was trained at, from config.json or the position embedding grid."""
    if hf_config and "image_size" in hf_config:
        return int(hf_config["image_size"])
    if ("pos_embed",) not in converted or ("patch_embed", "kernel") not in converted:
        return None
    tokens = converted[("pos_embed",)][1].shape[1] - num_prefix_tokens
    grid = int(round(tokens**0.5))
    return grid * converted[("patch_embed", "kernel")][1].shape[0] if grid * grid == tokens else None


def stack_blocks(values: dict, depth: int) -> dict:
    """Per-block arrays ('blocks', i, ...) -> one array per variable with a leading layer axis (scan_layers)."""
    out = {p: v for p, v in values.items() if p[0] != "blocks"}
    rests = sorted({p[2:] for p in values if p[0] == "blocks"})
    for rest in rests:
        out[("blocks", *rest)] = np.stack([values[("blocks", i, *rest)] for i in range(depth)])
    return out
