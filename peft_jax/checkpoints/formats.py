"""Reading checkpoint files into flat {name: numpy array} dicts, and telling layouts apart.

Only data formats are read: safetensors, numpy ``.npz`` with ``allow_pickle=False``,
torch zip files through ``torch.load(weights_only=True)``, and legacy (pre-1.6) torch files
through ``torch_legacy``'s tensors-only unpickler, which needs no torch. Nothing is ever
unpickled freely, because a checkpoint downloaded from the internet is untrusted input.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from peft_jax.checkpoints.core import CheckpointError
from peft_jax.checkpoints.torch_legacy import is_legacy_torch_file, read_legacy_torch
from peft_jax.files import read_json

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclasses.dataclass
class Checkpoint:
    path: pathlib.Path
    arrays: dict[str, np.ndarray]
    layout: str  # one of LAYOUTS
    hf_config: dict | None = None  # config.json of a Hugging Face directory


# layout -> (model family, description for messages)
LAYOUTS = {
    "hf_vit": ("vit", "Hugging Face transformers ViT"),
    "timm_vit": ("vit", "timm ViT"),
    "google_vit": ("vit", "Google vision_transformer .npz"),
    "hf_resnet": ("resnet", "Hugging Face transformers ResNet"),
    "torchvision_resnet": ("resnet", "torchvision / timm ResNet"),
    "lukemelas_efficientnet": ("efficientnet", "efficientnet-lite-pytorch / EfficientNet-PyTorch"),
}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError

    try:
        return _safetensors_arrays(path)
    except (SafetensorError, OSError) as e:  # a truncated copy, another format under this name
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download or copy it again") from None


def _safetensors_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    arrays, bfloat16 = {}, []
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            try:
                arrays[key] = f.get_tensor(key)
            except TypeError:  # numpy has no bfloat16
                bfloat16.append(key)
    if bfloat16:
        with jax.default_device(jax.devices("cpu")[0]), safe_open(str(path), framework="flax") as f:
            for key in bfloat16:
                arrays[key] = np.asarray(f.get_tensor(key), np.float32)
    return arrays


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    if is_legacy_torch_file(path):
        return read_legacy_torch(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading a torch file needs PyTorch (pip install torch); "
            "or convert it to .safetensors"
        ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors and containers
        raise CheckpointError(f"{path}: not a plain torch state dict ({e})") from e
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy() for k, v in obj.items()
    }


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from e


def _read_hf_dir(path: pathlib.Path) -> dict[str, np.ndarray]:
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if index.is_file():
        shards = sorted(set(read_json(index, "download the checkpoint again")["weight_map"].values()))
        arrays = {}
        for shard in shards:
            arrays.update(_read_safetensors(path / shard))
        return arrays
    if (path / "pytorch_model.bin").is_file():
        return _read_torch(path / "pytorch_model.bin")
    raise CheckpointError(
        f"{path}: a Hugging Face directory needs model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin next to config.json"
    )


def detect_layout(arrays: dict[str, np.ndarray]) -> str | None:
    """The key layout of a flat state dict, from a few characteristic names."""
    keys = set(arrays)
    google = {k.removeprefix("opt/target/") for k in keys}
    if "embedding/kernel" in google and any(k.startswith("Transformer/") for k in google):
        return "google_vit"
    if "patch_embed.proj.weight" in keys:
        return "timm_vit"
    if {"embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.weight"} & keys:
        return "hf_vit"
    if {"embedder.embedder.convolution.weight", "resnet.embedder.embedder.convolution.weight"} & keys:
        return "hf_resnet"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision_resnet"
    if "_conv_stem.weight" in keys and "_blocks.0._depthwise_conv.weight" in keys:
        return "lukemelas_efficientnet"
    return None


def read_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Reads a checkpoint file or Hugging Face directory and detects its layout."""
    path = pathlib.Path(path).expanduser()
    hf_config = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a checkpoint directory must be a Hugging Face one with config.json")
        hf_config = read_json(path / "config.json", "download the checkpoint again")
        arrays = _read_hf_dir(path)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    elif path.suffix == ".safetensors":
        arrays = _read_safetensors(path)
    elif path.suffix == ".npz":
        arrays = _read_npz(path)
    elif path.suffix in TORCH_SUFFIXES:
        arrays = _read_torch(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format; expected .safetensors, .npz, "
            f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face directory"
        )
    layout = detect_layout(arrays)
    if layout is None:
        sample = ", ".join(sorted(arrays)[:8])
        known = "; ".join(desc for _, desc in LAYOUTS.values())
        raise CheckpointError(f"{path}: unrecognised key layout (first keys: {sample}); known layouts: {known}")
    if layout == "google_vit":
        arrays = {k.removeprefix("opt/target/"): v for k, v in arrays.items()}
    return Checkpoint(path=path, arrays=arrays, layout=layout, hf_config=hf_config)
