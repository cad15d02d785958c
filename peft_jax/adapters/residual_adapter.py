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

On EfficientNet the k x k convolutions of the blocks are depth-wise, and the adapter keeps its
convolution's connectivity (a 1x1 with the same groups: one weight per channel, He-initialised
with that 1x1's fan-out); the expand and project 1x1s stay frozen like ResNet's (an adapter
beside a 1x1 would be as large as the convolution). The stem (3 -> 32, 3x3) gets a dense one.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import ParallelConv, cnn_layout, is_depthwise, merge_parallel, spatial_block_convs
from peft_jax.adapters.core import (
    METHODS, Method, adapter_variables, any_of, modules_matching, register, replace_module,
)
from peft_jax.errors import UserError

_he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualAdapterConv(ParallelConv):
    """A convolution with a parallel 1x1 residual adapter."""


def residual_adapter_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg
    targets = spatial_block_convs(model)
    if not targets:
        raise UserError("residual_adapter: the model has no k x k convolution in its residual blocks")
    targets += modules_matching(model, (nnx.Conv,), cnn_layout(model).stem)
    for path, conv in targets:
        # A (1, 1, in, out) kernel's fan-out is out, as for the reference's 1x1 convolutions; a depth-wise
        # adapter is a (1, 1, 1, C) kernel, one weight per channel.
        cin = 1 if is_depthwise(conv) else conv.in_features
        alpha = _he_fan_out(rngs.params(), (1, 1, cin, conv.out_features))[0, 0]
        alpha = alpha[0] if is_depthwise(conv) else alpha
        replace_module(model, path, ResidualAdapterConv(conv, alpha, what="residual_adapter", path=path))


register(Method(
    name="residual_adapter",
    doc="Parallel residual adapters (Rebuffi et al. 2018): a 1x1 convolution beside the stem convolution and each "
        "k x k convolution of the residual blocks (per channel beside a depth-wise one), and the BatchNorm gamma "
        "and beta.",
    trainable=lambda cfg: any_of(adapter_variables, METHODS["bn_tune"].trainable(cfg)),
    surgery=residual_adapter_surgery,
    merge=lambda model: merge_parallel(model, ResidualAdapterConv),
    archs=("cnn",),
))
