"""The valid names of models, PEFT methods and datasets, importable without JAX, Flax or TFDS.

A launcher checks a config's names here before its heavy imports, so a typo is reported in
about a second with a suggestion. The registries (``peft_jax.models``, ``peft_jax.adapters.core``,
``peft_jax.data``) use these tables; ``tests/test_names.py`` checks that they agree.
"""
from __future__ import annotations

import difflib

from peft_jax.errors import UserError

VIT_NAMES = ("vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_h14")  # models/vit.py VIT_VARIANTS
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")
EFFICIENTNET_NAMES = tuple(f"efficientnet_lite{i}" for i in range(5))  # models/efficientnet.py
MODEL_NAMES: tuple[str, ...] = VIT_NAMES + RESNET_NAMES + EFFICIENTNET_NAMES

# Model families as PEFT methods see them: a CNN is a ResNet or an EfficientNet-Lite.
FAMILIES = ("vit", "cnn", "unet")
FAMILY_TITLES = {"vit": "ViT", "cnn": "CNN (ResNet, EfficientNet-Lite)", "unet": "U-Net"}

# peft.method -> the families it applies to (each method's Method.archs; register() checks).
METHOD_FAMILIES: dict[str, tuple[str, ...]] = {
    "full": ("vit", "cnn", "unet"), "linear": ("vit", "cnn"), "bitfit": ("vit", "cnn"), "ssf": ("vit", "cnn"),
    "lora": ("vit", "unet"), "difffit": ("vit", "unet"),
    "dora": ("vit",), "ln_tune": ("vit",), "attention_tune": ("vit",), "adapter_houlsby": ("vit",),
    "adapter_pfeiffer": ("vit",), "adaptformer": ("vit",), "convpass": ("vit",), "ia3": ("vit",),
    "fact_tt": ("vit",), "fact_tk": ("vit",), "repadapter": ("vit",), "vpt_deep": ("vit",), "vpt_shallow": ("vit",),
    "bn_tune": ("cnn",), "conv_adapter": ("cnn",), "film": ("cnn",), "lora_conv": ("cnn",), "partial": ("cnn",),
    "residual_adapter": ("cnn",), "tsa": ("cnn",),
    "attention": ("unet",), "bias": ("unet",), "norm": ("unet",), "norm_bias": ("unet",),
    "norm_bias_attention": ("unet",), "svdiff": ("unet",),
}

# Single-label MedMNIST 2D sets (chestmnist is multi-label: refused) and the TFDS builders.
MEDMNIST_NAMES = ("pathmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
                  "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist")
BUILDER_NAMES = ("busi", "chest_xray_pneumonia", "ham10000", "fitzpatrick17k", "smdg", "iu_xray",
                 "rsna_pneumonia", "mimic_cxr")  # data/builders/__init__.py BUILDERS
DATASET_NAMES: tuple[str, ...] = tuple(sorted(MEDMNIST_NAMES + BUILDER_NAMES))


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UserError:
    """A UserError that names the bad value, the closest valid ones and all valid ones."""
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid)}")


def model_family(model_name: str) -> str:
    """'vit' or 'cnn' for a registered classifier name."""
    if model_name in VIT_NAMES:
        return "vit"
    if model_name in RESNET_NAMES + EFFICIENTNET_NAMES:
        return "cnn"
    raise unknown_name_error("model (model.name)", model_name, MODEL_NAMES)


def family_methods(family: str) -> list[str]:
    return sorted(n for n, fams in METHOD_FAMILIES.items() if family in fams)


def check_method(method: str, family: str) -> list[str]:
    """The '+'-separated names of ``peft.method``; an unknown one, or one of another family, is refused."""
    names = [n.strip() for n in str(method).split("+") if n.strip()]
    valid = family_methods(family)
    title = FAMILY_TITLES[family]
    if not names:
        raise UserError(f"peft.method is empty; valid names for {title} models: {', '.join(valid)}")
    for n in names:
        if n not in METHOD_FAMILIES:
            raise unknown_name_error(f"PEFT method (peft.method) for {title} models", n, valid)
        if family not in METHOD_FAMILIES[n]:
            where = ", ".join(FAMILY_TITLES[f] for f in METHOD_FAMILIES[n])
            raise UserError(f"PEFT method {n!r} applies to {where} models, not {title}; "
                             f"valid names for {title} models: {', '.join(valid)}")
    return names


def check_dataset(name: str) -> None:
    if name == "chestmnist":
        raise UserError("dataset.name 'chestmnist' is multi-label (14 findings per image); peft_jax trains "
                         f"single-label classifiers. Valid names: {', '.join(DATASET_NAMES)}")
    if name not in DATASET_NAMES:
        raise unknown_name_error("dataset (dataset.name)", name, DATASET_NAMES)


def check_names(cfg) -> None:
    """Refuses an unknown model.name, dataset.name or peft.method (for that model's family), cheaply."""
    family = model_family(cfg.model.name)
    check_method(cfg.peft.method, family)
    check_dataset(cfg.dataset.name)
