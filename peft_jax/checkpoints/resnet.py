"""ResNet weights from torchvision / timm state dicts and Hugging Face transformers.

torchvision and timm share one key layout (``layer1.0.conv1.weight``, ``fc.weight``);
transformers names the same tensors ``resnet.encoder.stages.0.layers.0.layer.0...``.
Both are walked along our model's structure, so a key the structure needs and the file
lacks is reported as missing, and a key left over as unexpected.
"""
from __future__ import annotations

from peft_jax.checkpoints.core import CheckpointError, KeyMapper, torch_conv, torch_linear
from peft_jax.models.resnet import BOTTLENECK_EXPANSION, RESNET_DEPTHS, STAGE_WIDTHS


def blocks(depth: int):
    """(stage index 0-3, block index, number of convs, has a projection shortcut) of each block."""
    kind, counts = RESNET_DEPTHS[depth]
    n_convs = 2 if kind == "basic" else 3
    for s, n in enumerate(counts):
        for b in range(n):
            # The first block of a stage projects when it strides or changes the width.
            yield s, b, n_convs, b == 0 and (s > 0 or kind == "bottleneck")


def map_torch_batch_norm(m: KeyMapper, target: tuple, prefix: str) -> None:
    """torch BatchNorm2d weight, bias, running_mean, running_var -> nnx.BatchNorm scale, bias, mean, var."""
    m.map((*target, "scale"), f"{prefix}.weight")
    m.map((*target, "bias"), f"{prefix}.bias")
    m.map((*target, "mean"), f"{prefix}.running_mean")
    m.map((*target, "var"), f"{prefix}.running_var")
    m.drop(f"{prefix}.num_batches_tracked")


def convert_torchvision(m: KeyMapper, depth: int) -> None:
    """torchvision / timm names: conv1, bn1, layerS.B.convK, layerS.B.downsample.{0,1}, fc."""
    m.map(("conv1", "kernel"), "conv1.weight", torch_conv)
    map_torch_batch_norm(m, ("bn1",), "bn1")
    for s, b, n_convs, projects in blocks(depth):
        layer, src = f"layer{s + 1}", f"layer{s + 1}.{b}"
        for k in range(1, n_convs + 1):
            m.map((layer, b, f"conv{k}", "kernel"), f"{src}.conv{k}.weight", torch_conv)
            map_torch_batch_norm(m, (layer, b, f"bn{k}"), f"{src}.bn{k}")
        if projects:
            m.map((layer, b, "downsample", "conv", "kernel"), f"{src}.downsample.0.weight", torch_conv)
            map_torch_batch_norm(m, (layer, b, "downsample", "bn"), f"{src}.downsample.1")
    if m.has("fc.weight") or m.has("fc.bias"):
        m.map(("head", "kernel"), "fc.weight", torch_linear)
        m.map(("head", "bias"), "fc.bias")


def convert_hf(m: KeyMapper, depth: int) -> None:
    """transformers ResNetForImageClassification / ResNetModel on-disk names."""
    p = "resnet." if m.has("resnet.embedder.embedder.convolution.weight") else ""
    m.map(("conv1", "kernel"), f"{p}embedder.embedder.convolution.weight", torch_conv)
    map_torch_batch_norm(m, ("bn1",), f"{p}embedder.embedder.normalization")
    for s, b, n_convs, projects in blocks(depth):
        layer, src = f"layer{s + 1}", f"{p}encoder.stages.{s}.layers.{b}"
        for k in range(n_convs):
            m.map((layer, b, f"conv{k + 1}", "kernel"), f"{src}.layer.{k}.convolution.weight", torch_conv)
            map_torch_batch_norm(m, (layer, b, f"bn{k + 1}"), f"{src}.layer.{k}.normalization")
        if projects:
            m.map((layer, b, "downsample", "conv", "kernel"), f"{src}.shortcut.convolution.weight", torch_conv)
            map_torch_batch_norm(m, (layer, b, "downsample", "bn"), f"{src}.shortcut.normalization")
    if m.has("classifier.1.weight") or m.has("classifier.1.bias"):
        m.map(("head", "kernel"), "classifier.1.weight", torch_linear)
        m.map(("head", "bias"), "classifier.1.bias")


def check_hf_config(where: str, config: dict, depth: int) -> None:
    """Refuses a transformers ResNet whose config.json describes another network than resnet{depth}."""
    kind, counts = RESNET_DEPTHS[depth]
    widths = [w * (1 if kind == "basic" else BOTTLENECK_EXPANSION) for w in STAGE_WIDTHS]
    want = {
        "layer_type": kind, "depths": list(counts), "hidden_sizes": widths, "embedding_size": 64,
        "num_channels": 3, "hidden_act": "relu", "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
    }
    bad = [f"{k}={config[k]!r} (resnet{depth}: {v!r})" for k, v in want.items() if k in config and config[k] != v]
    if bad:
        raise CheckpointError(f"{where}: config.json does not describe resnet{depth}: " + ", ".join(bad))
