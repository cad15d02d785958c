"""PEFT methods: one file per family, all registered in ``core.METHODS``."""
from peft_jax.adapters import lora, selective, ssf  # noqa: F401  (registers the methods)
from peft_jax.adapters import conv_adapter, film, lora_conv, partial, residual_adapter, tsa  # noqa: F401  (CNN methods)
from peft_jax.adapters import bottleneck, convpass, difffit, fact, ia3, repadapter, vpt  # noqa: F401  (ViT methods)
from peft_jax.adapters import diffusion  # noqa: F401  (Stable Diffusion U-Net methods)
from peft_jax.adapters.core import (
    ADAPTER_TYPES,
    METHODS,
    AdapterParam,
    apply_peft,
    merge,
    method_names,
    param_report,
    trainable_filter,
)

__all__ = [
    "ADAPTER_TYPES", "METHODS", "AdapterParam", "apply_peft", "merge", "method_names",
    "param_report", "trainable_filter",
]
