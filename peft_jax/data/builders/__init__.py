"""TFDS builders for the medical datasets whose owners require a manual download.

Builders are imported lazily (by `get`), so MedMNIST users never pay for importing TFDS.
"""
from __future__ import annotations

import importlib

# dataset.name -> (module, builder class, folder name under $PEFT_JAX_DATA).
BUILDERS: dict[str, tuple[str, str, str]] = {
    "busi": ("peft_jax.data.builders.busi", "Busi", "busi"),
    "chest_xray_pneumonia": ("peft_jax.data.builders.chest_xray_pneumonia", "ChestXrayPneumonia", "chest_xray"),
    "ham10000": ("peft_jax.data.builders.ham10000", "Ham10000", "ham10000"),
    "fitzpatrick17k": ("peft_jax.data.builders.fitzpatrick17k", "Fitzpatrick17k", "fitzpatrick17k"),
    "smdg": ("peft_jax.data.builders.smdg", "Smdg", "smdg"),
    "iu_xray": ("peft_jax.data.builders.iu_xray", "IuXray", "iu_xray"),
    "rsna_pneumonia": ("peft_jax.data.builders.rsna_pneumonia", "RsnaPneumonia", "rsna_pneumonia"),
    "mimic_cxr": ("peft_jax.data.builders.mimic_cxr", "MimicCxr", "mimic_cxr"),
}


def get(name: str) -> type:
    """The builder class of a dataset."""
    module, cls, _ = BUILDERS[name]
    return getattr(importlib.import_module(module), cls)


def family(name: str) -> str:
    return BUILDERS[name][2]
