"""Export LoRA, DoRA and (IA)^3 adapters in the Hugging Face ``peft`` layout for a transformers ViT.

The folder holds ``adapter_model.safetensors`` (keys such as
``base_model.model.vit.layers.0.attention.q_proj.lora_A.weight``, torch layouts) and
``adapter_config.json`` (``LoraConfig`` or ``IA3Config``), with the new head as a ``modules_to_save``
classifier. ``peft.PeftModel.from_pretrained(vit, folder)`` then reproduces this model's
logits on a transformers ``ViTForImageClassification`` carrying the same base weights. Names
are transformers 5's in-memory module names (NOTES.md), which is what peft matches. This
module owns the name mapping; ``import_hf`` reads the same layout back through it.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from peft_jax.adapters.core import iter_wrapped, method_names, path_str
from peft_jax.adapters.ia3 import ChannelScale
from peft_jax.adapters.lora import DoRALinear, LoRALinear
from peft_jax.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HEAD_KEYS = {"kernel": "base_model.model.classifier.weight", "bias": "base_model.model.classifier.bias"}
# peft_jax module names -> transformers 5 ViT module names.
HF_NAMES = {
    ("attn", "query"): "attention.q_proj",
    ("attn", "key"): "attention.k_proj",
    ("attn", "value"): "attention.v_proj",
    ("attn", "out"): "attention.o_proj",
    ("mlp", "fc1"): "mlp.fc1",
    ("mlp", "fc2"): "mlp.fc2",
}
# The peft method -> its wrapper class and the adapter tensors: (peft key suffix, wrapper attribute).
WRAPPERS = {
    "lora": (LoRALinear, (("lora_A.weight", "lora_a"), ("lora_B.weight", "lora_b"))),
    "dora": (DoRALinear, (("lora_A.weight", "lora_a"), ("lora_B.weight", "lora_b"),
                          ("lora_magnitude_vector", "magnitude"))),
    "ia3": (ChannelScale, (("ia3_l", "scale"),)),
}


def target_regex(hf_targets: list[str]) -> str:
    """A ``peft.targets`` regex for transformers module names such as ``["q_proj", "fc1"]``."""
    ours = {hf.split(".")[-1]: "/".join(p) for p, hf in HF_NAMES.items()}
    unknown = sorted(set(hf_targets) - set(ours))
    if unknown:
        raise UserError(f"target_modules {unknown} name no ViT linear layer peft_jax adapts (supported: "
                         f"{sorted(ours)})")
    return "(" + "|".join(ours[t] for t in sorted(set(hf_targets))) + ")$"


def hf_module_names(path: tuple, depth: int) -> tuple[list[str], str]:
    """(the peft key prefix of each layer, the short module name) of a wrapped linear.

    A scanned model holds all layers in one wrapper, stacked along the first axis.
    """
    logical = tuple(p for p in path if p != "base")
    name = HF_NAMES.get(logical[-2:])
    if logical[0] != "blocks" or name is None:
        raise UserError(f"export_hf: no transformers ViT name for the adapter layer at {path_str(path)}")
    layers = [logical[1]] if isinstance(logical[1], int) else list(range(depth))
    return [f"base_model.model.vit.layers.{i}.{name}" for i in layers], name.split(".")[-1]


def torch_layout(method: str, attribute: str, value: np.ndarray, side: str | None = None) -> np.ndarray:
    """One layer's adapter tensor as peft stores it."""
    if attribute in ("lora_a", "lora_b"):
        return np.ascontiguousarray(value.T)  # (in, r) <-> (r, in); (r, out) <-> (out, r)
    if method == "ia3":
        return value[:, None] if side == "out" else value[None, :]  # (out, 1) or (1, in)
    return value


def from_torch_layout(attribute: str, value: np.ndarray) -> np.ndarray:
    """The inverse of `torch_layout`: one layer's peft tensor as the wrapper's attribute holds it."""
    if attribute in ("lora_a", "lora_b"):
        return value.T
    return value.reshape(-1)  # ia3_l (out, 1) / (1, in) and the DoRA magnitude (out,)


def single_method(peft_config: ml_collections.ConfigDict) -> str:
    names = method_names(peft_config)
    if len(names) != 1 or names[0] not in WRAPPERS:
        raise UserError(f"Hugging Face peft adapters are {sorted(WRAPPERS)} (one at a time); peft.method is "
                         f"{peft_config.method!r}")
    return names[0]


def _hf_config(method: str, targets: set, ranks: set, scalings: set, base: str | None) -> dict:
    common = {"task_type": None, "base_model_name_or_path": base, "modules_to_save": ["classifier"],
              "target_modules": sorted(targets), "fan_in_fan_out": False, "inference_mode": True}
    if method == "ia3":
        feedforward = sorted(t for t in targets if t.startswith("fc"))
        return {**common, "peft_type": "IA3", "feedforward_modules": feedforward, "init_ia3_weights": True}
    (rank,), (scaling,) = ranks, scalings
    return {**common, "peft_type": "LORA", "r": int(rank), "lora_alpha": float(scaling * rank), "lora_dropout": 0.0,
            "bias": "none", "use_dora": method == "dora", "use_rslora": False, "init_lora_weights": True}


def export_hf(model: nnx.Module, peft_config: ml_collections.ConfigDict, directory: str | pathlib.Path, *,
              base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes ``model``'s LoRA, DoRA or (IA)^3 adapter and head as a Hugging Face peft adapter folder."""
    method = single_method(peft_config)
    wrapper_type, tensors = WRAPPERS[method]
    arrays: dict[str, np.ndarray] = {}
    targets, ranks, scalings = set(), set(), set()
    for path, wrapper in iter_wrapped(model, wrapper_type):
        prefixes, name = hf_module_names(path, model.config.depth)
        side = getattr(wrapper, "side", None)  # (IA)^3: scales a layer's output or its input
        for suffix, attribute in tensors:
            value = np.asarray(getattr(wrapper, attribute)[...], np.float32)
            stacked = value if len(prefixes) > 1 else value[None]
            for prefix, layer_value in zip(prefixes, stacked):
                arrays[f"{prefix}.{suffix}"] = torch_layout(method, attribute, layer_value, side)
        targets.add(name)
        ranks.add(getattr(wrapper, "rank", None))
        scalings.add(getattr(wrapper, "scaling", None))
    if not arrays:
        raise UserError(f"export_hf: the model has no {method} layers (apply_peft with peft.method={method!r} first)")
    arrays[HEAD_KEYS["kernel"]] = np.ascontiguousarray(np.asarray(model.head.kernel[...], np.float32).T)
    arrays[HEAD_KEYS["bias"]] = np.asarray(model.head.bias[...], np.float32)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(directory / ADAPTER_WEIGHTS))
    config = _hf_config(method, targets, ranks, scalings, base_model_name_or_path)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
