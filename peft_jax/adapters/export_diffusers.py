"""Export a U-Net LoRA in the layout diffusers loads: ``pytorch_lora_weights.safetensors``.

Keys are peft's, prefixed with the pipeline component: ``unet.<module>.lora_A.weight`` (r, in)
and ``unet.<module>.lora_B.weight`` (out, r), where ``<module>`` is the diffusers module name
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``). diffusers derives the
rank from the shapes and, without network alphas, takes ``lora_alpha = rank`` (scale 1), so the
scale ``alpha / rank`` is folded into ``lora_B``. ``StableDiffusionPipeline.load_lora_weights(folder)``
or ``UNet2DConditionModel.load_lora_adapter(folder, prefix="unet")`` then reproduce this U-Net.
"""
from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from peft_jax.adapters.core import iter_wrapped, method_names, path_str
from peft_jax.adapters.lora import LoRALinear
from peft_jax.checkpoints.diffusers import checkpoint_module_name
from peft_jax.errors import UserError

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def export_lora_diffusers(unet: nnx.Module, peft_config: ml_collections.ConfigDict,
                          directory: str | pathlib.Path) -> pathlib.Path:
    """Writes the LoRA factors of a U-Net (after ``apply_peft`` with peft.method='lora') into ``directory``."""
    if method_names(peft_config) != ["lora"]:
        raise UserError(f"export_diffusers exports plain LoRA adapters; peft.method is {peft_config.method!r}")
    arrays: dict[str, np.ndarray] = {}
    for path, wrapper in iter_wrapped(unet, LoRALinear):
        if "base" in path:
            raise UserError(f"export_diffusers: the LoRA layer at {path_str(path)} is nested in another wrapper")
        prefix = f"unet.{checkpoint_module_name(path)}"
        a = np.asarray(wrapper.lora_a[...], np.float32)
        b = np.asarray(wrapper.lora_b[...], np.float32) * np.float32(wrapper.scaling)
        arrays[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)
        arrays[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if not arrays:
        raise UserError("export_diffusers: the U-Net has no LoRA layers (apply_peft with peft.method='lora' first)")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory
