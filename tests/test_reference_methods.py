"""Each PEFT method against its official code: the reference's forward written in torch from that
code, with the same weights copied in, compared in output and gradients; for the selective
methods, the exact set of trained variables against the reference's selection rule.

The reference file of each test is named in its docstring (and in docs/methods_*.md).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from peft_jax.adapters import apply_peft, trainable_filter
from peft_jax.adapters.conv_adapter import ConvAdapter, ConvAdapterBottleneck, PrePoolNorm
from peft_jax.adapters.residual_adapter import ResidualAdapterConv
from peft_jax.config import base_config
from peft_jax.models import create_model
from peft_jax.models import resnet as resnet_lib


def peft_cfg(method, **kw):
    c = base_config().peft
    c.method = method
    c.update(kw)
    return c


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def oihw(kernel) -> torch.Tensor:
    """A Flax HWIO convolution kernel as torch's OIHW weight."""
    return t(kernel).permute(3, 2, 0, 1).contiguous()


def trained_names(model, cfg) -> set[str]:
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))}


def randomize_batch_norms(model, seed):
    """Random running statistics and affine parameters: a swapped or skipped BatchNorm shows."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = m.num_features
            m.mean[...] = jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)
            m.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            m.bias[...] = jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)


def perturb(model, variable_type, seed, std=0.05):
    """Moves parameters of one type away from their initialisation (a zero or unit start hides a mix-up)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, variable_type)
    nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), state))


def normal(seed, shape, mean=0.0):
    return jnp.asarray(mean + np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def torch_bn(bn: nnx.BatchNorm) -> torch.nn.BatchNorm2d:
    ref = torch.nn.BatchNorm2d(bn.num_features, eps=1e-5).eval()
    with torch.no_grad():
        ref.weight.copy_(t(bn.scale[...]))
        ref.bias.copy_(t(bn.bias[...]))
        ref.running_mean.copy_(t(bn.mean[...]))
        ref.running_var.copy_(t(bn.var[...]))
    return ref


def torch_conv(conv: nnx.Conv, **kw) -> torch.nn.Conv2d:
    kh, kw_, cin, cout = conv.kernel.shape
    ref = torch.nn.Conv2d(cin, cout, (kh, kw_), bias=False, **kw)
    with torch.no_grad():
        ref.weight.copy_(oihw(conv.kernel[...]))
    return ref


def compare_with_torch(module, reference, x, params_of, ref_params):
    """Output and gradients (input, adapter parameters) of ``module`` vs ``reference`` for a random cotangent.

    ``params_of(grads_state)`` and ``ref_params()`` list the same parameters in the same order,
    in Flax and in torch layouts (``ref_params`` returns (tensor, to_flax) pairs). Returns, for the
    output and each gradient, max |difference| / max(1, max |reference|) (the absolute figures are printed).
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    cot = normal(9, jax.eval_shape(lambda p: nnx.merge(graphdef, p, rest)(x), params).shape)

    def loss(p, x):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y * cot), y

    (_, out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    xt = t(x).permute(0, 3, 1, 2).requires_grad_(True)
    out_t = reference(xt)
    (out_t * t(cot).permute(0, 3, 1, 2)).sum().backward()
    pairs = {"output": (out, out_t.detach().permute(0, 2, 3, 1)), "grad input": (g_x, xt.grad.permute(0, 2, 3, 1))}
    for i, (ours, (theirs, to_flax)) in enumerate(zip(params_of(g_params), ref_params())):
        pairs[f"grad {i}"] = (ours, to_flax(theirs.grad))
    return report_diffs(pairs)


def report_diffs(pairs) -> dict[str, float]:
    """max |a - b| / max(1, max |b|) per named pair (absolute below 1: a gradient that is zero in exact
    arithmetic, such as the key bias's, is rounding noise in both); prints max |a - b| and max |b|."""
    rel, shown = {}, []
    for name, (a, b) in pairs.items():
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        rel[name] = diff / max(scale, 1.0)
        shown.append(f"{name}: {diff:.1e} of {scale:.2g}")
    print("max |diff|:", "; ".join(shown))
    return rel


def rel_diff(a, b) -> float:
    return report_diffs({"value": (a, b)})["value"]


# ============================================================================ CNN methods


class RefConvAdapter(torch.nn.Module):
    """Hhhhhhao/Conv-Adapter ``models/tuning_modules/conv_adapter.py`` ``ConvAdapter`` ("Design 2 v4"):
    grouped k x k conv (bias) -> ReLU -> 1x1 conv (bias) -> times a (1, C, 1, 1) scale ``se``."""

    def __init__(self, cin, cout, width, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, width, 3, stride=stride, padding=1, groups=width)
        self.conv2 = torch.nn.Conv2d(width, cout, 1)
        self.se = torch.nn.Parameter(torch.ones(1, cout, 1, 1))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x))) * self.se

    def load(self, branch):
        with torch.no_grad():
            self.conv1.weight.copy_(oihw(branch.down_kernel[...]))
            self.conv1.bias.copy_(t(branch.down_bias[...]))
            self.conv2.weight.copy_(t(branch.up_kernel[...]).T[:, :, None, None])
            self.conv2.bias.copy_(t(branch.up_bias[...]))
            self.se.copy_(t(branch.adapter_scale[...])[None, :, None, None])
        return self

    def params(self):
        return [(self.conv1.weight, lambda g: g.permute(2, 3, 1, 0)), (self.conv1.bias, lambda g: g),
                (self.conv2.weight, lambda g: g[:, :, 0, 0].T), (self.conv2.bias, lambda g: g),
                (self.se, lambda g: g.reshape(-1))]


def branch_grads(branch_state):
    return [branch_state[k][...] for k in ("down_kernel", "down_bias", "up_kernel", "up_bias", "adapter_scale")]


class RefConvAdapterBottleneck(torch.nn.Module):
    """Hhhhhhao/Conv-Adapter ``models/backbones/resnet.py`` ``Bottleneck.forward`` with ``conv_adapt``:
    the adapter reads relu(bn1(conv1(x))) and is added after relu(bn2(conv2(.)))."""

    def __init__(self, block: ConvAdapterBottleneck, stride: int):
        super().__init__()
        b = block.base
        self.conv1, self.bn1 = torch_conv(b.conv1), torch_bn(b.bn1)
        self.conv2, self.bn2 = torch_conv(b.conv2, stride=stride, padding=1), torch_bn(b.bn2)
        self.conv3, self.bn3 = torch_conv(b.conv3), torch_bn(b.bn3)
        self.downsample = torch.nn.Sequential(torch_conv(b.downsample.conv, stride=stride), torch_bn(b.downsample.bn))
        width = b.conv2.kernel.shape[-1]
        self.tuning_module = RefConvAdapter(width, width, block.adapter.groups, stride).load(block.adapter)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out_adapt = self.tuning_module(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = out + out_adapt
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


def test_conv_adapter_bottleneck_matches_the_reference_block():
    """ResNet-50's layer2[0] (256 -> 128 -> 512, stride 2, gamma 8) against Conv-Adapter's ``resnet.py``."""
    block = ConvAdapterBottleneck(resnet_lib.Bottleneck(256, 128, 2, rngs=nnx.Rngs(0)), 8, rngs=nnx.Rngs(1),
                                  path=("layer2", 0))
    randomize_batch_norms(block, 2)
    perturb(block.adapter, nnx.Param, 3)
    block.eval()
    reference = RefConvAdapterBottleneck(block, stride=2)
    x = normal(4, (2, 10, 10, 256))
    diffs = compare_with_torch(block, reference, x, lambda g: branch_grads(g["adapter"]),
                               reference.tuning_module.params)
    assert max(diffs.values()) < 1e-5, diffs


class RefConvAdapterBasicConv(torch.nn.Module):
    """The reference's basic-block adapter (``ConvAdapter(inplanes, planes, width=inplanes // gamma,
    stride=stride)``) beside ``conv1``, added before ``bn1``."""

    def __init__(self, wrapped: ConvAdapter, stride: int):
        super().__init__()
        cin, cout = wrapped.base.kernel.shape[-2:]
        self.conv = torch_conv(wrapped.base, stride=stride, padding=1)
        self.tuning_module = RefConvAdapter(cin, cout, wrapped.adapter.groups, stride).load(wrapped.adapter)

    def forward(self, x):
        return self.conv(x) + self.tuning_module(x)


def test_conv_adapter_basic_block_matches_the_reference_adapter():
    wrapped = ConvAdapter(resnet_lib.conv(64, 128, 3, 2, nnx.Rngs(0)), 8, rngs=nnx.Rngs(1), path=("layer2", 0, "conv1"))
    perturb(wrapped.adapter, nnx.Param, 3)
    reference = RefConvAdapterBasicConv(wrapped, stride=2)
    x = normal(4, (2, 9, 9, 64))
    diffs = compare_with_torch(wrapped, reference, x, lambda g: branch_grads(g["adapter"]),
                               reference.tuning_module.params)
    assert max(diffs.values()) < 1e-5, diffs


def test_conv_adapter_pre_pool_norm_matches_the_reference():
    """The reference ResNet's ``self.norm`` (a fresh BatchNorm2d) before ``avgpool``, in training mode."""
    pool = PrePoolNorm(resnet_lib.GlobalAvgPool(), 16, rngs=nnx.Rngs(0))
    perturb(pool.norm, nnx.Param, 1, std=0.3)
    pool.train()
    x = normal(2, (4, 5, 5, 16), mean=3.0)
    norm = torch.nn.BatchNorm2d(16).train()
    with torch.no_grad():
        norm.weight.copy_(t(pool.norm.scale[...]))
        norm.bias.copy_(t(pool.norm.bias[...]))
    want = norm(t(x).permute(0, 3, 1, 2)).mean(dim=(2, 3)).detach()
    assert rel_diff(pool(x), want) < 1e-5


def test_conv_adapter_trains_what_the_reference_trains():
    """``models/__init__.py`` ``conv_adapt``: the head, every ``tuning_module`` and the pre-pool ``norm``."""
    cfg = peft_cfg("conv_adapter")
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("resnet50", num_classes=2, image_size=64, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    blocks = [(s, b) for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n)]
    assert all(isinstance(getattr(model, f"layer{s}")[b], ConvAdapterBottleneck) for s, b in blocks)
    assert isinstance(model.pool, PrePoolNorm)
    leaves = ("down_kernel", "down_bias", "up_kernel", "up_bias", "adapter_scale")
    assert trained_names(model, cfg) == (
        {f"layer{s}/{b}/adapter/{leaf}" for s, b in blocks for leaf in leaves}
        | {"pool/norm/scale", "pool/norm/bias", "head/kernel", "head/bias"})
    basic = nnx.eval_shape(lambda: apply_peft(
        create_model("resnet18", num_classes=2, image_size=32, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    assert all(isinstance(getattr(basic, f"layer{s}")[b].conv1, ConvAdapter) for s in range(1, 5) for b in range(2))


class RefConvTask(torch.nn.Module):
    """srebuffi/residual_adapters ``models.py`` ``conv_task`` in ``parallel_adapters`` mode:
    bn(conv(x) + parallel_conv(x)), the parallel 1x1 with the convolution's stride, no dropout."""

    def __init__(self, wrapped: ResidualAdapterConv, bn: nnx.BatchNorm, stride: int, padding: int):
        super().__init__()
        cin, cout = wrapped.alpha.shape
        self.conv = torch_conv(wrapped.base, stride=stride, padding=padding)
        self.parallel_conv = torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        with torch.no_grad():
            self.parallel_conv.weight.copy_(t(wrapped.alpha[...]).T[:, :, None, None])
        self.bns = torch_bn(bn)

    def forward(self, x):
        return self.bns(self.conv(x) + self.parallel_conv(x))

    def params(self):
        return [(self.parallel_conv.weight, lambda g: g[:, :, 0, 0].T)]


class ConvBN(nnx.Module):
    def __init__(self, conv, bn):
        self.conv, self.bn = conv, bn

    def __call__(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("kernel,cin,padding", [(7, 3, 3), (3, 64, 1)])  # the stem, a stride-2 3x3
def test_residual_adapter_matches_the_reference_conv_task(kernel, cin, padding):
    """A convolution with its parallel adapter and BatchNorm against ``conv_task``."""
    conv = nnx.Conv(cin, 64, (kernel, kernel), strides=2, padding=((padding, padding),) * 2, use_bias=False,
                    rngs=nnx.Rngs(0))
    alpha = 0.1 * normal(1, (cin, 64))
    module = ConvBN(ResidualAdapterConv(conv, alpha, what="residual_adapter", path=("conv",)),
                    resnet_lib.batch_norm(64, nnx.Rngs(2)))
    randomize_batch_norms(module, 2)
    module.eval()
    reference = RefConvTask(module.conv, module.bn, 2, padding)
    x = normal(4, (2, 15, 15, cin))
    diffs = compare_with_torch(module, reference, x, lambda g: [g["conv"]["alpha"][...]], reference.params)
    assert max(diffs.values()) < 1e-5, diffs


def test_residual_adapter_trains_what_the_reference_trains():
    """``train_new_task_adapters.py`` freezes the 3x3 kernels; everything else trains: the parallel adapters
    (stem included), every BatchNorm and the classifier. Our 1x1 backbone convolutions stay frozen too."""
    cfg = peft_cfg("residual_adapter")
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("resnet18", num_classes=2, image_size=32, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    adapters = {"conv1/alpha"} | {f"layer{s}/{b}/conv{c}/alpha" for s in range(1, 5) for b in range(2)
                                  for c in (1, 2)}
    norms = {"/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    assert trained_names(model, cfg) == (adapters | {f"{n}/{leaf}" for n in norms for leaf in ("scale", "bias")}
                                         | {"head/kernel", "head/bias"})
