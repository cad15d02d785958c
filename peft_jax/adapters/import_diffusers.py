"""Import a Stable Diffusion U-Net LoRA in diffusers' or kohya's layout: the reverse of ``export_diffusers``.

Three key layouts are read, all for linear layers of the U-Net:

- diffusers / peft: ``unet.<module>.lora_A.weight`` (r, in) and ``unet.<module>.lora_B.weight``
  (out, r), scale 1 (what ``save_lora_weights`` and ``export_diffusers`` write);
- diffusers' older attention-processor names: ``unet.<module>.lora.down.weight`` / ``lora.up.weight``;
- kohya (sd-scripts): ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` and a
  scalar ``.alpha``, scale ``alpha / r``.

``<module>`` is the diffusers module name (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``),
matched against the names of the NNX U-Net's own linear layers, so a key that names no layer is an
error, not a silently skipped tensor. Each module's scale is folded into its ``lora_b`` (the
config's alpha equals the rank), so modules with different alphas load exactly.
"""
from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from peft_jax.adapters.core import apply_peft, iter_wrapped, path_str
from peft_jax.adapters.export_diffusers import WEIGHTS_FILE
from peft_jax.adapters.lora import LoRALinear
from peft_jax.checkpoints.diffusers import checkpoint_module_name
from peft_jax.errors import UserError
from peft_jax.files import read_safetensors

KOHYA_PREFIX = "lora_unet_"
_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_TEXT_ENCODER = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


def lora_file(path: str | pathlib.Path) -> pathlib.Path:
    """The weights file of a diffusers LoRA folder, or a (kohya) ``.safetensors`` file itself."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path}: expected a diffusers LoRA folder (with {WEIGHTS_FILE}) or a .safetensors file")
    return path


def is_diffusers_lora(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a diffusers LoRA folder or a LoRA ``.safetensors`` file (not a peft_jax adapter)."""
    path = pathlib.Path(path)
    return (path / WEIGHTS_FILE).is_file() or (path.is_file() and path.suffix == ".safetensors")


def _module_and_part(key: str, kohya_names: dict[str, str], where: pathlib.Path) -> tuple[str, str]:
    if key.startswith(_TEXT_ENCODER):
        raise UserError(f"{where}: {key} is a text-encoder LoRA; peft_jax puts LoRA on the U-Net only")
    if key.startswith(KOHYA_PREFIX):
        stem, _, suffix = key.partition(".")
        module = kohya_names.get(stem)
    else:
        stem, suffix = next(((key[: -len(s) - 1], s) for s in _PARTS if key.endswith("." + s)), (key, ""))
        module = stem.removeprefix("unet.")
    if suffix not in _PARTS or module is None:
        raise UserError(f"{where}: {key} names no linear layer of this U-Net (expected unet.<module>.lora_A.weight, "
                         f"...lora.down.weight or lora_unet_<module>.lora_down.weight)")
    return module, _PARTS[suffix]


def read_lora(path: str | pathlib.Path, unet: nnx.Module) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{U-Net module path: (A (in, r), B (r, out) with the module's scale folded in)} of a LoRA file."""
    where = lora_file(path)
    linears = {checkpoint_module_name(p): p for p, m in nnx.iter_modules(unet) if isinstance(m, nnx.Linear)}
    kohya_names = {KOHYA_PREFIX + name.replace(".", "_"): name for name in linears}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in read_safetensors(where, "download or copy the LoRA file again").items():
        module, part = _module_and_part(key, kohya_names, where)
        groups.setdefault(module, {})[part] = np.asarray(value, np.float32)
    factors = {}
    for module, g in sorted(groups.items()):
        if module not in linears:
            raise UserError(f"{where}: {module} is not a linear layer of this U-Net")
        if "down" not in g or "up" not in g or g["down"].ndim != 2:
            found = {k: v.shape for k, v in g.items()}
            raise UserError(f"{where}: {module} needs a 2-D down (A) and up (B) matrix; found {found}")
        rank = g["down"].shape[0]
        scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
        factors[linears[module]] = (g["down"].T, g["up"].T * np.float32(scale))
    if not factors:
        raise UserError(f"{where}: no U-Net LoRA weights in the file")
    return factors


def apply_diffusers_lora(unet: nnx.Module, path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Puts a diffusers or kohya LoRA on the NNX U-Net (surgery and weights); returns its ``peft`` config."""
    factors = read_lora(path, unet)
    ranks = sorted({a.shape[1] for a, _ in factors.values()})
    if len(ranks) != 1:
        raise UserError(f"{path}: the LoRA has several ranks {ranks}; peft_jax's LoRA uses one rank")
    targets = "^(" + "|".join(re.escape(path_str(p)) for p in sorted(factors, key=path_str)) + ")$"
    cfg = ml_collections.ConfigDict(dict(method="lora", rank=ranks[0], alpha=float(ranks[0]), targets=targets))
    apply_peft(unet, cfg, rngs=nnx.Rngs(0))
    for module_path, wrapper in iter_wrapped(unet, LoRALinear):
        a, b = factors[module_path]
        wrapper.lora_a[...] = jnp.asarray(a, wrapper.lora_a[...].dtype)
        wrapper.lora_b[...] = jnp.asarray(b, wrapper.lora_b[...].dtype)
    return cfg
