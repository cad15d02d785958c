"""EfficientNet-Lite weights from ``efficientnet-lite-pytorch`` / EfficientNet-PyTorch state dicts.

The file's names (``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0``, ``_fc``) are walked
along our model's block list, so a block the structure has and the file lacks is reported
as missing, and a block the file has beyond it (another variant) as unexpected.
"""
from __future__ import annotations

from peft_jax.checkpoints.core import KeyMapper, torch_conv, torch_linear
from peft_jax.checkpoints.resnet import map_torch_batch_norm
from peft_jax.models.efficientnet import EfficientNetConfig, block_specs


def convert(m: KeyMapper, cfg: EfficientNetConfig) -> None:
    m.map(("conv_stem", "kernel"), "_conv_stem.weight", torch_conv)
    map_torch_batch_norm(m, ("bn0",), "_bn0")
    for b, (_, _, _, _, expand) in enumerate(block_specs(cfg)):
        src = f"_blocks.{b}"
        if expand != 1:
            m.map(("blocks", b, "expand_conv", "kernel"), f"{src}._expand_conv.weight", torch_conv)
            map_torch_batch_norm(m, ("blocks", b, "bn0"), f"{src}._bn0")
        m.map(("blocks", b, "depthwise_conv", "kernel"), f"{src}._depthwise_conv.weight", torch_conv)
        map_torch_batch_norm(m, ("blocks", b, "bn1"), f"{src}._bn1")
        m.map(("blocks", b, "project_conv", "kernel"), f"{src}._project_conv.weight", torch_conv)
        map_torch_batch_norm(m, ("blocks", b, "bn2"), f"{src}._bn2")
    m.map(("conv_head", "kernel"), "_conv_head.weight", torch_conv)
    map_torch_batch_norm(m, ("bn1",), "_bn1")
    if m.has("_fc.weight") or m.has("_fc.bias"):
        m.map(("head", "kernel"), "_fc.weight", torch_linear)
        m.map(("head", "bias"), "_fc.bias")
