"""Export a LoRA adapter in the Hugging Face ``peft`` layout for a transformers ViT.

The folder holds ``adapter_model.safetensors`` (keys such as
``base_model.model.vit.layers.0.attention.q_proj.lora_A.weight``, torch layouts) and
``adapter_config.json`` (``LoraConfig``), with the new head as a ``modules_to_save``
classifier. ``peft.PeftModel.from_pretrained(vit, folder)`` then reproduces this model's
logits on a transformers ``ViTForImageClassification`` carrying the same base weights. Names
are transformers 5's in-memory module names (NOTES.md), which is what peft matches.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from peft_jax.adapters.core import iter_wrapped, method_names, path_str
from peft_jax.adapters.lora import LoRALinear

# peft_jax module names -> transformers 5 ViT module names.
HF_NAMES = {
    ("attn", "query"): "attention.q_proj",
    ("attn", "key"): "attention.k_proj",
    ("attn", "value"): "attention.v_proj",
    ("attn", "out"): "attention.o_proj",
    ("mlp", "fc1"): "mlp.fc1",
    ("mlp", "fc2"): "mlp.fc2",
}


def _hf_layers(path: tuple, depth: int) -> tuple[list[int], str]:
    """(layer indices, transformers sub-module name) of a wrapped linear; a scanned model holds all layers."""
    logical = tuple(p for p in path if p != "base")
    name = HF_NAMES.get(logical[-2:])
    if logical[0] != "blocks" or name is None:
        raise ValueError(f"export_hf: no transformers ViT name for the LoRA layer at {path_str(path)}")
    layers = [logical[1]] if isinstance(logical[1], int) else list(range(depth))
    return layers, name


def export_lora_hf(model: nnx.Module, peft_config: ml_collections.ConfigDict, directory: str | pathlib.Path, *,
                   base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes ``model``'s LoRA factors and head as a Hugging Face peft adapter folder; returns it."""
    if method_names(peft_config) != ["lora"]:
        raise ValueError(f"export_hf exports plain LoRA adapters; peft.method is {peft_config.method!r}")
    directory = pathlib.Path(directory)
    depth = model.config.depth
    arrays: dict[str, np.ndarray] = {}
    targets, ranks, scalings = set(), set(), set()
    for path, wrapper in iter_wrapped(model, LoRALinear):
        layers, name = _hf_layers(path, depth)
        a, b = np.asarray(wrapper.lora_a[...]), np.asarray(wrapper.lora_b[...])
        if len(layers) == 1 and a.ndim == 2:
            a, b = a[None], b[None]
        for i, layer in enumerate(layers):
            prefix = f"base_model.model.vit.layers.{layer}.{name}"
            arrays[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # (r, in)
            arrays[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # (out, r)
        targets.add(name.split(".")[-1])
        ranks.add(wrapper.rank)
        scalings.add(wrapper.scaling)
    if not arrays:
        raise ValueError("export_hf: the model has no LoRA layers (apply_peft with peft.method='lora' first)")
    (rank,), (scaling,) = ranks, scalings
    arrays["base_model.model.classifier.weight"] = np.ascontiguousarray(np.asarray(model.head.kernel[...]).T)
    arrays["base_model.model.classifier.bias"] = np.asarray(model.head.bias[...])
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in arrays.items()}, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": float(scaling * rank),
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "modules_to_save": ["classifier"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
