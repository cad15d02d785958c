"""Parallel residual adapters (Rebuffi, Bilen & Vedaldi, "Efficient parametrization of
multi-domain deep neural networks", CVPR 2018; the series form is their NeurIPS 2017 paper).

Beside every 3x3 convolution of the residual blocks and beside the stem's first convolution
(the reference's ``pre_layers_conv`` is a ``conv_task`` with an adapter too; srebuffi/
residual_adapters ``models.py``), a 1x1 convolution with the same stride reads the same input
and adds to its output. The BatchNorm layers are task-specific too, so their gamma and beta
train with the adapters (the reference, ``train_new_task_adapters.py``, freezes only the 3x3
kernels of the shared network; here every backbone convolution stays frozen: the stem is a
7x7 and ResNet-50's 1x1 convolutions are shared weights as well). As in the reference, the
adapters start from the network's He initialisation (normal, std sqrt(2 / fan_out)), not from
zero, with no dropout (its default ``--dropout 00``). Linear, so they fold into the centre tap
of their convolution (``merge``).
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import ParallelConv, block_convs, merge_parallel
from peft_jax.adapters.core import (
    METHODS, Method, adapter_variables, any_of, modules_matching, register, replace_module,
)

_he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualAdapterConv(ParallelConv):
    """A convolution with a parallel 1x1 residual adapter."""


def residual_adapter_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg
    targets = block_convs(model, 3)
    if not targets:
        raise ValueError("residual_adapter: the model has no 3x3 convolution in residual blocks (layer1..4)")
    targets += modules_matching(model, (nnx.Conv,), r"^conv1$")  # the stem
    for path, conv in targets:
        cin, cout = conv.kernel.shape[-2:]
        # A (1, 1, in, out) kernel's fan-out is out, as for the reference's 1x1 convolutions.
        alpha = _he_fan_out(rngs.params(), (1, 1, cin, cout))[0, 0]
        replace_module(model, path, ResidualAdapterConv(conv, alpha, what="residual_adapter", path=path))


register(Method(
    name="residual_adapter",
    doc="Parallel residual adapters (Rebuffi et al. 2018): a 1x1 convolution beside the stem convolution and each "
        "3x3 convolution of the residual blocks, and the BatchNorm gamma and beta.",
    trainable=lambda cfg: any_of(adapter_variables, METHODS["bn_tune"].trainable(cfg)),
    surgery=residual_adapter_surgery,
    merge=lambda model: merge_parallel(model, ResidualAdapterConv),
    archs=("resnet",),
))
