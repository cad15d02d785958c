"""Import a Hugging Face ``peft`` adapter trained in PyTorch on a transformers ViT: LoRA, DoRA, (IA)^3.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what
``PeftModel.save_pretrained`` writes) goes onto the peft_jax ViT that carries the same base
weights, after ``apply_peft`` with the matching ``peft.*`` settings (`peft_config_from_hf` reads
them from the folder). LoRA's rank, alpha, rsLoRA scaling and any of the ViT's linear layers as
targets, DoRA's magnitudes and (IA)^3's vectors are taken; the ``classifier`` of
``modules_to_save`` becomes the head. Names and layouts are ``export_hf``'s, so an adapter
exported again loads back into PyTorch peft with the same logits.
"""
from __future__ import annotations

import math
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from peft_jax.adapters.core import iter_wrapped
from peft_jax.adapters.export_hf import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_KEYS, WRAPPERS, from_torch_layout, hf_module_names, single_method,
    target_regex,
)
from peft_jax.config import base_config
from peft_jax.errors import UserError
from peft_jax.files import read_json, read_safetensors

# adapter_config.json options peft_jax does not implement, with the value that means "off".
_OFF = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None,
        "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "exclude_modules": None,
        "target_parameters": None, "use_qalora": False}
_IA3_TARGETS, _IA3_FEEDFORWARD = {"k_proj", "v_proj", "fc2"}, {"fc2"}


def read_hf_adapter(directory: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    directory = pathlib.Path(directory)
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory}: not a Hugging Face peft adapter folder (no {' or '.join(missing)})")
    fix = "download or copy the adapter folder again"
    return read_json(directory / ADAPTER_CONFIG, fix), read_safetensors(directory / ADAPTER_WEIGHTS, fix)


def peft_settings(config: dict, where: str) -> dict:
    """The peft_jax ``peft.*`` fields that reproduce an adapter_config.json."""
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise UserError(f"{where}: peft_type {kind!r} is not supported (supported: LORA, LORA with use_dora, IA3)")
    odd = sorted(f"{k}={config[k]!r}" for k, off in _OFF.items() if config.get(k) and config[k] != off)
    if odd:
        raise UserError(f"{where}: adapter options peft_jax does not implement: {', '.join(odd)}")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise UserError(f"{where}: target_modules={targets!r}: peft_jax reads a list of module names "
                         "(e.g. [\"q_proj\", \"v_proj\"]), not a regex")
    if kind == "IA3":
        if set(targets) != _IA3_TARGETS or set(config.get("feedforward_modules") or []) != _IA3_FEEDFORWARD:
            raise UserError(f"{where}: peft_jax's ia3 scales k_proj, v_proj and fc2's input (the (IA)^3 paper's "
                             f"placement); this adapter has target_modules={sorted(targets)}, "
                             f"feedforward_modules={config.get('feedforward_modules')}")
        return {"method": "ia3"}
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):  # scaling alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= math.sqrt(rank)
    return {"method": "dora" if config.get("use_dora") else "lora", "rank": rank, "alpha": alpha,
            "targets": target_regex(targets)}


def peft_config_from_hf(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``base_config().peft`` with the settings of a Hugging Face adapter folder, for ``apply_peft``."""
    cfg = base_config().peft
    cfg.update(peft_settings(read_hf_adapter(directory)[0], str(directory)))
    return cfg


def _check_settings(peft_config: ml_collections.ConfigDict, settings: dict, where: str) -> None:
    differ = [k for k in ("method", "rank", "alpha") if k in settings and not (
        math.isclose(float(peft_config[k]), settings[k]) if k == "alpha" else peft_config[k] == settings[k])]
    if differ:
        flags = " ".join(f"--config.peft.{k}={v}" for k, v in settings.items())
        raise UserError(f"{where}: the adapter is {', '.join(f'{k}={settings[k]!r}' for k in differ)}, the run "
                         f"has {', '.join(f'peft.{k}={peft_config[k]!r}' for k in differ)}; set {flags}")


def _load_head(model: nnx.Module, arrays: dict, where: str) -> set[str]:
    """The adapter's classifier as the head when its class count fits; the keys it used."""
    if not all(k in arrays for k in HEAD_KEYS.values()):
        return set()
    kernel = arrays[HEAD_KEYS["kernel"]].T
    if kernel.shape != model.head.kernel[...].shape:
        print(f"[init] {where}: the adapter's {kernel.shape[1]}-class classifier does not fit the "
              f"{model.head.kernel[...].shape[1]}-class head, which is re-initialised")
        return set(HEAD_KEYS.values())
    model.head.kernel[...] = jnp.asarray(kernel, model.head.kernel[...].dtype)
    model.head.bias[...] = jnp.asarray(arrays[HEAD_KEYS["bias"]], model.head.bias[...].dtype)
    return set(HEAD_KEYS.values())


def load_hf_adapter(model: nnx.Module, directory: str | pathlib.Path, peft_config: ml_collections.ConfigDict) -> None:
    """Sets the adapter of a Hugging Face peft folder on ``model`` (after ``apply_peft(model, peft_config)``).

    Every adapter tensor must find its layer and every adapted layer its tensors: a mismatch
    names the keys and the ``peft.targets`` that would fit.
    """
    where = str(directory)
    config, arrays = read_hf_adapter(directory)
    settings = peft_settings(config, where)
    _check_settings(peft_config, settings, where)
    wrapper_type, tensors = WRAPPERS[single_method(peft_config)]
    used, missing, mis_shaped = _load_head(model, arrays, where), [], []
    for path, wrapper in iter_wrapped(model, wrapper_type):
        prefixes, _ = hf_module_names(path, model.config.depth)
        for suffix, attribute in tensors:
            keys = [f"{p}.{suffix}" for p in prefixes]
            missing += [k for k in keys if k not in arrays]
            if any(k not in arrays for k in keys):
                continue
            layers = [from_torch_layout(attribute, arrays[k]) for k in keys]
            value = np.stack(layers) if len(keys) > 1 else layers[0]
            var = getattr(wrapper, attribute)
            if value.shape != var[...].shape:
                mis_shaped.append(f"{keys[0]}: adapter {value.shape}, model {var[...].shape}")
                continue
            var[...] = jnp.asarray(value, var[...].dtype)
            used.update(keys)
    unexpected = sorted(set(arrays) - used)
    if missing or unexpected or mis_shaped:
        hint = f"; peft.targets={settings['targets']!r} fits its target_modules" if "targets" in settings else ""
        raise UserError(f"{where} does not fit the model: missing {sorted(missing)[:6]}, unexpected "
                         f"{unexpected[:6]}, mis-shaped {mis_shaped[:6]}{hint}")


def start_from_hf_adapter(model: nnx.Module, cfg: ml_collections.ConfigDict) -> None:
    """``init.adapter``: a run continues from a PyTorch peft adapter on the base of ``init.checkpoint``."""
    directory = cfg.init.get("adapter")
    if not directory:
        return
    if not cfg.init.checkpoint:
        base = read_hf_adapter(directory)[0].get("base_model_name_or_path")
        raise UserError(f"init.adapter={directory} needs init.checkpoint: the transformers ViT the adapter was "
                         f"trained on" + (f" (its adapter_config.json names {base!r})" if base else ""))
    load_hf_adapter(model, directory, cfg.peft)
