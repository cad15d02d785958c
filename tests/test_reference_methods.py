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


# ============================================================================ ViT methods
# A one-block ViT-Ti (width 192, 3 heads, MLP 768); its block against a torch pre-norm block (timm's
# ``Block``) whose linear layers are the method's, written from the method's reference code.

LINEARS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")


def vit_block(method, **kw):
    cfg = peft_cfg(method, **kw)
    model = apply_peft(create_model("vit_ti16", num_classes=2, image_size=32, patch_size=8, depth=1,
                                    rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    perturb(model, nnx.Param, 2, std=0.05)  # every weight, adapters included, away from its start
    model.eval()
    return model.blocks[0], cfg


def torch_leaves(module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` as a torch leaf in the Flax layout, keyed by its path."""
    return {"/".join(map(str, p)): t(v.get_value()).requires_grad_(True)
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def base_linear(w, name, x):
    """The frozen projection ``name`` (possibly wrapped: its weights then sit under ``base/``)."""
    prefix = name if f"{name}/kernel" in w else f"{name}/base"
    return x @ w[f"{prefix}/kernel"] + w[f"{prefix}/bias"]


def block_settings(block) -> tuple[int, float, bool]:
    """(heads, LayerNorm eps, tanh GELU) of one of our ViT blocks."""
    return block.attn.num_heads, block.norm1.epsilon, block.mlp.approximate


def torch_vit_block(settings, w, x, linear):
    """timm ``Block.forward`` (pre-norm) in torch; ``linear(name, h)`` computes each projection."""
    (heads, eps, approximate), d = settings, x.shape[-1]
    mlp_act = lambda h: F.gelu(h, approximate="tanh" if approximate else "none")  # noqa: E731
    h = F.layer_norm(x, (d,), w["norm1/scale"], w["norm1/bias"], eps)
    b, n, _ = h.shape
    q, k, v = (linear(f"attn/{p}", h).reshape(b, n, heads, d // heads).transpose(1, 2)
               for p in ("query", "key", "value"))
    att = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5).softmax(-1)
    x = x + linear("attn/out", (att @ v).transpose(1, 2).reshape(b, n, d))
    h = F.layer_norm(x, (d,), w["norm2/scale"], w["norm2/bias"], eps)
    return x + linear("mlp/fc2", mlp_act(linear("mlp/fc1", h)))


def compare_tokens(module, reference, x, frozen=()):
    """``module(x)`` vs ``reference(w, x)`` (``w``: torch leaves of every parameter): output, input
    gradient and the gradient of every parameter but the ``frozen`` ones (which the reference may
    treat as constants), for a random cotangent; relative differences."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    cot = normal(9, jax.eval_shape(lambda p: nnx.merge(graphdef, p, rest)(x), params).shape)

    def loss(p, x):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y * cot), y

    (_, out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    w = torch_leaves(module)
    xt = t(x).requires_grad_(True)
    out_t = reference(w, xt)
    (out_t * t(cot)).sum().backward()
    pairs = {"output": (out, out_t.detach()), "grad input": (g_x, xt.grad)}
    grads = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g_params)}
    for name, leaf in w.items():
        if name in frozen:
            continue
        assert leaf.grad is not None, f"the reference does not use {name}"
        pairs[f"grad {name}"] = (grads[name], leaf.grad)
    rel = report_diffs(pairs)
    return rel


def tokens(seed=4):
    return normal(seed, (2, 17, 192))


def test_adapter_houlsby_matches_adapter_bert():
    """google-research/adapter-bert ``modeling.py`` ``feedforward_adapter``: ``x + gelu(x W1 + b1) W2 + b2``
    (BERT's tanh GELU) on the output of the attention projection and of the MLP, before the residual."""
    block, _ = vit_block("adapter_houlsby")

    def linear(w, name, h):
        y = base_linear(w, name, h)
        if name not in ("attn/out", "mlp/fc2"):
            return y
        a = f"{name}/adapter"
        gelu = 0.5 * (1.0 + torch.tanh((2 / np.pi) ** 0.5 * (y @ w[f"{a}/down_kernel"] + w[f"{a}/down_bias"]
                                                              + 0.044715 * (y @ w[f"{a}/down_kernel"]
                                                                            + w[f"{a}/down_bias"]) ** 3)))
        net = (y @ w[f"{a}/down_kernel"] + w[f"{a}/down_bias"]) * gelu
        return net @ w[f"{a}/up_kernel"] + w[f"{a}/up_bias"] + y

    diffs = compare_tokens(
        block, lambda w, x: torch_vit_block(block_settings(block), w, x, lambda n, h: linear(w, n, h)), tokens())
    assert max(diffs.values()) < 1e-5, diffs


def test_adapter_houlsby_init_and_trained_variables_follow_adapter_bert():
    """Both projections truncated-normal (sigma 1e-3, cut at 2 sigma), biases zero; ``optimization.py``
    trains the "adapters", "layer_norm" and "head" collections: every LayerNorm of the ViT."""
    cfg = peft_cfg("adapter_houlsby")
    model = apply_peft(create_model("vit_ti16", num_classes=2, image_size=32, patch_size=8, depth=2,
                                    rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    adapter = model.blocks[0].mlp.fc2.adapter
    for kernel in (adapter.down_kernel[...], adapter.up_kernel[...]):
        assert 0.7e-3 < float(jnp.std(kernel)) < 1e-3 and float(jnp.abs(kernel).max()) <= 2e-3
    assert not np.any(adapter.down_bias[...]) and not np.any(adapter.up_bias[...])
    leaves = ("down_kernel", "down_bias", "up_kernel", "up_bias")
    want = ({f"blocks/{i}/{n}/adapter/{leaf}" for i in range(2) for n in ("attn/out", "mlp/fc2") for leaf in leaves}
            | {f"blocks/{i}/{n}/{p}" for i in range(2) for n in ("norm1", "norm2") for p in ("scale", "bias")}
            | {"norm/scale", "norm/bias", "head/kernel", "head/bias"})
    assert trained_names(model, cfg) == want
    assert trained_names(model, peft_cfg("adapter_houlsby", adapter_norms=False)) == {
        n for n in want if "adapter" in n or n.startswith("head/")}


def test_adaptformer_matches_the_reference_block():
    """ShoufaChen/AdaptFormer ``models/custom_modules.py`` ``Block.forward`` (``ffn_option="parallel"``,
    no adapter LayerNorm, scalar 0.1) with ``models/adapter.py`` ``Adapter``: up(dropout(relu(down(x))))."""
    block, _ = vit_block("adaptformer")

    def reference(w, x):
        b = {k[len("base/"):]: v for k, v in w.items() if k.startswith("base/")}
        d, eps = x.shape[-1], block.base.norm1.epsilon
        h = F.layer_norm(x, (d,), b["norm1/scale"], b["norm1/bias"], eps)
        heads = block.base.attn.num_heads
        bb, n, _ = h.shape
        q, k, v = (base_linear(b, f"attn/{p}", h).reshape(bb, n, heads, d // heads).transpose(1, 2)
                   for p in ("query", "key", "value"))
        att = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5).softmax(-1)
        x = x + base_linear(b, "attn/out", (att @ v).transpose(1, 2).reshape(bb, n, d))
        adapt = F.relu(x @ w["adapter/down_kernel"] + w["adapter/down_bias"]) @ w["adapter/up_kernel"] \
            + w["adapter/up_bias"]
        act = "tanh" if block.base.mlp.approximate else "none"
        h = F.layer_norm(x, (d,), b["norm2/scale"], b["norm2/bias"], eps)
        mlp = base_linear(b, "mlp/fc2", F.gelu(base_linear(b, "mlp/fc1", h), approximate=act))
        return x + mlp + 0.1 * adapt

    diffs = compare_tokens(block, reference, tokens())
    assert max(diffs.values()) < 1e-5, diffs


def test_adaptformer_drops_the_hidden_units_at_the_reference_rate():
    """``Adapter(dropout=0.1)``: dropout on the ReLU output (``F.dropout(down, p)``), only in training."""
    block, _ = vit_block("adaptformer")
    adapter = block.adapter
    assert adapter.dropout.rate == 0.1
    x = tokens()
    eval_out = block(x)
    adapter.dropout.rate = 0.5
    block.train()
    hidden = jax.nn.relu(x @ adapter.down_kernel[...] + adapter.down_bias[...])
    # up(mask * hidden / (1 - p)) + b: recover mask / (1 - p) through the (full-rank) up-projection
    kept = jnp.linalg.lstsq(adapter.up_kernel[...].T, (adapter(x) - adapter.up_bias[...]).reshape(-1, 192).T)[0]
    ratio = np.asarray(kept.T.reshape(hidden.shape) / jnp.where(hidden == 0, 1.0, hidden))[np.asarray(hidden) > 1e-2]
    assert set(np.round(ratio, 2)) <= {0.0, 2.0} and 0.4 < np.mean(ratio < 1) < 0.6
    adapter.dropout.rate = 0.1
    block.eval()
    np.testing.assert_allclose(block(x), eval_out, rtol=1e-6)


def fact_tk_reference_linear(w, name, h, form):
    """JieShibo/PETL-ViT ``FacT/fact_tk.py``: ``fact_forward_attn`` and (``form="official"``)
    ``fact_forward_mlp``; ``form="paper"``: the paper's slices (C_m = T[:, :, m], not transposed).

    FacTu / FacTv are ``nn.Linear`` (weights ``u.T``, ``v.T``); FacTc is G (r, r, r); the model-wide
    FacTp (r, 144) holds, per block, the P columns of q, k, v, proj, then fc1 (4) and fc2 (4): here each
    layer's own columns."""
    y = base_linear(w, name, h)
    shared = next(k[: -len("/u")] for k in w if k.endswith("shared/u"))
    u, v, g = w[f"{shared}/u"], w[f"{shared}/v"], w[f"{shared}/core_tensor"]
    fact_u, fact_v = (lambda z: F.linear(z, u.T)), (lambda z: F.linear(z, v.T))
    c = g @ w[f"{name}/p"]  # (r, r, n): FacTc @ FacTp[:, idx:idx + n]
    r, n = u.shape[1], c.shape[-1]
    b, tok, dim = h.shape
    if name.startswith("attn/"):
        return y + fact_v(fact_u(h) @ c[:, :, 0])
    if form == "official" and name == "mlp/fc1":
        return y + fact_v((fact_u(h) @ c.reshape(r, n * r)).reshape(b, tok, n, r)).reshape(b, tok, -1)
    if form == "official":  # fc2
        return y + fact_v(fact_u(h.reshape(b, tok, n, dim // n)).reshape(b, tok, n * r) @ c.reshape(r, n * r).t())
    if name == "mlp/fc1":
        return y + torch.cat([fact_v(fact_u(h) @ c[:, :, m]) for m in range(n)], dim=-1)
    parts = h.reshape(b, tok, n, dim // n)
    return y + sum(fact_v(fact_u(parts[:, :, m]) @ c[:, :, m]) for m in range(n))


@pytest.mark.parametrize("form", ["official", "paper"])
def test_fact_tk_matches_the_official_code_or_the_paper(form):
    block, _ = vit_block("fact_tk", fact_tk_mlp=form, dropout=0.0)
    diffs = compare_tokens(
        block, lambda w, x: torch_vit_block(block_settings(block), w, x,
                                            lambda n, h: fact_tk_reference_linear(w, n, h, form)), tokens())
    assert max(diffs.values()) < 1e-5, diffs


def fact_tt_reference_linear(w, name, h):
    """JieShibo/PETL-ViT ``FacT/fact_tt.py``: ``fact_forward_attn`` / ``fact_forward_mlp`` with the per-layer
    ``nn.Linear`` cores (q/k/v/proj_FacTs r -> r, fc1_FacTs r -> 4r, fc2_FacTs 4r -> r), their weights built
    from our (blocks_in, blocks_out, r, r) cores: fc1's output m*r+s and fc2's input m*r+a are block m, rank s / a."""
    y = base_linear(w, name, h)
    shared = next(k[: -len("/u")] for k in w if k.endswith("shared/u"))
    u, v, cores = w[f"{shared}/u"], w[f"{shared}/v"], w[f"{name}/cores"]
    fact_u, fact_v = (lambda z: F.linear(z, u.T)), (lambda z: F.linear(z, v.T))
    r = u.shape[1]
    b, tok, dim = h.shape
    if name.startswith("attn/"):
        return y + fact_v(F.linear(fact_u(h), cores[0, 0].T))
    if name == "mlp/fc1":
        n = cores.shape[1]
        fc1_facts = cores[0].permute(0, 2, 1).reshape(n * r, r)  # weight[m r + s, a]
        return y + fact_v(F.linear(fact_u(h), fc1_facts).reshape(b, tok, n, r)).reshape(b, tok, -1)
    n = cores.shape[0]
    fc2_facts = cores[:, 0].permute(2, 0, 1).reshape(r, n * r)  # weight[s, m r + a]
    return y + fact_v(F.linear(fact_u(h.reshape(b, tok, n, dim // n)).reshape(b, tok, n * r), fc2_facts))


def test_fact_tt_matches_the_official_code():
    block, _ = vit_block("fact_tt", dropout=0.0)
    diffs = compare_tokens(
        block, lambda w, x: torch_vit_block(block_settings(block), w, x,
                                            lambda n, h: fact_tt_reference_linear(w, n, h)), tokens())
    assert max(diffs.values()) < 1e-5, diffs


def test_fact_tk_forms_differ():
    """The two MLP definitions are different functions of the same parameters; a bad name is an error."""
    x = tokens()
    outs = {}
    for form in ("official", "paper"):
        block, cfg = vit_block("fact_tk", fact_tk_mlp=form, dropout=0.0)
        outs[form] = block(x)
    assert float(jnp.abs(outs["official"] - outs["paper"]).max()) > 1e-3
    with pytest.raises(ValueError, match="peft.fact_tk_mlp must be one of"):
        vit_block("fact_tk", fact_tk_mlp="tucker")


# ============================================================================ Stable Diffusion U-Net methods

UNET_KW = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               attention_head_dim=2, norm_num_groups=8)


def tiny_unet():
    from peft_jax.models.diffusion import UNet2DConditionModel, UNetConfig

    return UNet2DConditionModel(UNetConfig(**UNET_KW), rngs=nnx.Rngs(0))


def diffusers_names(paths) -> set[str]:
    """Our variable paths under diffusers' parameter names (``checkpoint_module_name`` + weight/bias)."""
    from peft_jax.checkpoints.diffusers import checkpoint_module_name

    names = set()
    for path in paths:
        *module, leaf = path.split("/")
        module = tuple(int(p) if p.isdigit() else p for p in module if p != "base")
        names.add(f"{checkpoint_module_name(module)}.{'bias' if leaf == 'bias' else 'weight'}")
    return names


# Raman1121/Diffusion_Memorization_HPO ``adaptors.py``, ``get_adapted_unet``: which named parameters train.
REFERENCE_SELECTION = {
    "attention": lambda n: "attentions" in n,  # enable_attention_update
    "bias": lambda n: n.split(".")[-1] == "bias",  # enable_bias_update: every module's own parameter named bias
    "norm": lambda n: "norm" in n,  # enable_norm_update
}
REFERENCE_SELECTION["norm_bias"] = lambda n: REFERENCE_SELECTION["norm"](n) or REFERENCE_SELECTION["bias"](n)
REFERENCE_SELECTION["norm_bias_attention"] = lambda n: REFERENCE_SELECTION["norm_bias"](n) or "attentions" in n
REFERENCE_SELECTION["full"] = lambda n: True


@pytest.mark.parametrize("method", sorted(REFERENCE_SELECTION))
def test_unet_selective_methods_train_the_references_selection(method):
    """The exact set of trained parameters, by diffusers name, on a tiny U-Net built by diffusers and by us."""
    import diffusers

    reference = {n for n, _ in diffusers.UNet2DConditionModel(**UNET_KW).named_parameters()
                 if REFERENCE_SELECTION[method](n)}
    cfg = peft_cfg(method)
    model = nnx.eval_shape(lambda: apply_peft(tiny_unet(), cfg))
    assert diffusers_names(trained_names(model, cfg)) == reference


def test_unet_difffit_trains_the_references_selection():
    """mkshing/DiffFit-pytorch ``utils.py`` ``mark_only_biases_as_trainable``: names with bias, norm or gamma;
    per transformer block 11 gamma vectors (gamma_attn1, gamma_attn2, gamma_ff; gamma_q/k/v/fnn per attention)."""
    import diffusers

    from peft_jax.adapters.ia3 import ChannelScale

    cfg = peft_cfg("difffit")
    model = nnx.eval_shape(lambda: apply_peft(tiny_unet(), cfg))
    gammas = {"/".join(map(str, p)) + "/scale" for p, m in nnx.iter_modules(model) if isinstance(m, ChannelScale)}
    reference = diffusers.UNet2DConditionModel(**UNET_KW)
    weights = {n for n, _ in reference.named_parameters() if "bias" in n or "norm" in n}
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in reference.modules())
    trained = trained_names(model, cfg)
    assert gammas <= trained and diffusers_names(trained - gammas) == weights
    per_block = {}
    for g in gammas:
        block = g.split("/transformer_blocks/")[0] + "/" + g.split("/transformer_blocks/")[1].split("/")[0]
        per_block.setdefault(block, set()).add(g.split("/transformer_blocks/")[1].split("/", 1)[1])
    assert len(per_block) == blocks and all(v == {
        f"{a}/{p}/scale" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out", "to_out/base")}
        | {"ff/out/scale"} for v in per_block.values())


class WithContext(nnx.Module):
    def __init__(self, block, context):
        self.block, self.context = block, nnx.Variable(context)

    def __call__(self, x):
        return self.block(x, self.context[...])


def torch_attention(q, k, v, heads):
    b, n, d = q.shape
    q, k, v = (z.reshape(b, z.shape[1], heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(b, n, d)


def test_unet_difffit_block_matches_the_reference():
    """mkshing/DiffFit-pytorch ``attention.py`` ``BasicTransformerBlock.forward`` with ``attention_processor.py``
    ``DiffFitAttnProcessor``: x + gamma_attn * gamma_fnn * to_out(attention(gamma_q q, gamma_k k, gamma_v v)) for
    attn1 and attn2 (on the text), then x + gamma_ff * ff(norm3(x)) with diffusers' GEGLU, in torch."""
    model = apply_peft(tiny_unet(), peft_cfg("difffit"))
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    perturb(block, nnx.Param, 3, std=0.1)
    context = normal(5, (2, 5, 16))
    module = WithContext(block, context)
    heads = block.attn1.heads

    def reference(w, x):
        ctx = t(context)

        def gamma_linear(name, h):  # the linear layer, then each gamma wrapped around it
            gammas = []
            while f"{name}/kernel" not in w:
                gammas.append(w[f"{name}/scale"])
                name += "/base"
            y = h @ w[f"{name}/kernel"] + (w[f"{name}/bias"] if f"{name}/bias" in w else 0.0)
            for gamma in gammas:
                y = y * gamma
            return y

        def attn(prefix, h, source):
            q = gamma_linear(f"block/{prefix}/to_q", h)
            k, v = gamma_linear(f"block/{prefix}/to_k", source), gamma_linear(f"block/{prefix}/to_v", source)
            return gamma_linear(f"block/{prefix}/to_out", torch_attention(q, k, v, heads))

        def norm(name, h):
            return F.layer_norm(h, (h.shape[-1],), w[f"block/{name}/scale"], w[f"block/{name}/bias"], 1e-5)

        h = norm("norm1", x)
        x = x + attn("attn1", h, h)
        x = x + attn("attn2", norm("norm2", x), ctx)
        hidden, gate = base_linear(w, "block/ff/proj", norm("norm3", x)).chunk(2, dim=-1)
        return x + gamma_linear("block/ff/out", hidden * F.gelu(gate))

    diffs = compare_tokens(module, reference, normal(4, (2, 16, 16)))
    assert max(diffs.values()) < 1e-5, diffs


@pytest.mark.parametrize("kind", ["linear", "conv", "group_norm", "layer_norm"])
def test_svdiff_matches_svdiff_pytorch(kind):
    """mkshing/svdiff-pytorch ``layers.py``: ``SVDLinear``, ``SVDConv2d`` (the (out, in*kh*kw) matrix),
    ``SVDGroupNorm``, ``SVDLayerNorm`` (the scale as a (1, C) matrix): W' = U diag(relu(S + delta)) Vh, from
    torch's own SVD of the torch-layout weight; our shifts are copied in (both sort S descending)."""
    from peft_jax.adapters.diffusion import NormSpectralShift, SpectralShift

    rngs = nnx.Rngs(0)
    base, x = {
        "linear": (lambda: (nnx.Linear(12, 8, rngs=rngs), (2, 5, 12))),
        "conv": (lambda: (nnx.Conv(6, 8, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), rngs=rngs), (2, 7, 7, 6))),
        "group_norm": (lambda: (nnx.GroupNorm(8, num_groups=4, epsilon=1e-5, rngs=rngs), (2, 5, 5, 8))),
        "layer_norm": (lambda: (nnx.LayerNorm(8, epsilon=1e-5, rngs=rngs), (2, 5, 8))),
    }[kind]()
    perturb(base, nnx.Param, 1, std=0.3)  # a norm's scale and every bias away from 1 and 0
    module = NormSpectralShift(base) if kind.endswith("norm") else SpectralShift(base)
    delta = module.delta[...]
    # shifts large enough that some singular values cross zero (the ReLU)
    module.delta[...] = jnp.asarray([-0.4]) if kind.endswith("norm") else normal(2, delta.shape) * 0.5
    x = normal(4, x)

    def reference(w, x):
        base = w["base/kernel"] if "base/kernel" in w else w["base/scale"]
        if kind == "linear":
            weight = base.T
        elif kind == "conv":
            weight = base.permute(3, 2, 0, 1).reshape(base.shape[-1], -1)  # 'co cin h w -> co (cin h w)'
        else:
            weight = base[None]
        u, s, vh = torch.linalg.svd(weight.detach(), full_matrices=False)
        updated = u @ torch.diag(F.relu(s + w["delta"])) @ vh
        if kind == "linear":
            return F.linear(x, updated, w["base/bias"])
        if kind == "conv":
            out = F.conv2d(x.permute(0, 3, 1, 2), updated.reshape(base.shape[-1], base.shape[2], 3, 3),
                           w["base/bias"], padding=1)
            return out.permute(0, 2, 3, 1)
        if kind == "group_norm":
            return F.group_norm(x.permute(0, 3, 1, 2), 4, updated[0], w["base/bias"], 1e-5).permute(0, 2, 3, 1)
        return F.layer_norm(x, (8,), updated[0], w["base/bias"], 1e-5)

    # the kernel / scale is frozen; the reference takes its SVD as constants
    diffs = compare_tokens(module, reference, x, frozen=("base/kernel", "base/scale"))
    assert max(diffs.values()) < 3e-5, diffs  # grads of values ~8: float32 sums in another order


def test_svdiff_shifts_every_norm_of_the_unet():
    """``train_svdiff.py`` trains every ``delta``: one per singular value of each conv/linear kernel and one per
    GroupNorm / LayerNorm (the reference's U-Net makes every one of them an SVD layer)."""
    cfg = peft_cfg("svdiff")
    model = nnx.eval_shape(lambda: apply_peft(tiny_unet(), cfg))
    base = tiny_unet()
    norms = {"/".join(map(str, p)) for p, m in nnx.iter_modules(base) if isinstance(m, (nnx.GroupNorm, nnx.LayerNorm))}
    layers = {"/".join(map(str, p)) for p, m in nnx.iter_modules(base) if isinstance(m, (nnx.Linear, nnx.Conv))}
    assert trained_names(model, cfg) == {f"{p}/delta" for p in norms | layers}


# ============================================================================ against the reference package itself
# huggingface/peft (a test dependency): its tuner layers on a torch copy of the same block, the same weights copied in.


class TorchViTBlock(torch.nn.Module):
    """Our ViT block as torch modules named like ours (query, key, value, out, fc1, fc2), frozen weights copied."""

    def __init__(self, block):
        super().__init__()
        d = block.norm1.scale.shape[-1]
        self.settings = block_settings(block)
        self.eps = self.settings[1]
        self.norm1, self.norm2 = torch.nn.LayerNorm(d, eps=self.eps), torch.nn.LayerNorm(d, eps=self.eps)
        for norm, ours in ((self.norm1, block.norm1), (self.norm2, block.norm2)):
            with torch.no_grad():
                norm.weight.copy_(t(ours.scale[...]))
                norm.bias.copy_(t(ours.bias[...]))
        for name in LINEARS:
            layer = block.attn if name.startswith("attn") else block.mlp
            ours = getattr(layer, name.split("/")[1])
            while not hasattr(ours, "kernel"):
                ours = ours.base
            lin = torch.nn.Linear(*ours.kernel.shape)
            with torch.no_grad():
                lin.weight.copy_(t(ours.kernel[...]).T)
                lin.bias.copy_(t(ours.bias[...]))
            setattr(self, name.split("/")[1], lin)

    def forward(self, x):
        return torch_vit_block(self.settings, {"norm1/scale": self.norm1.weight, "norm1/bias": self.norm1.bias,
                                      "norm2/scale": self.norm2.weight, "norm2/bias": self.norm2.bias}, x,
                               lambda name, h: getattr(self, name.split("/")[1])(h))


def compare_with_package(module, reference, x, pairs):
    """Output, input gradient and the gradients of ``pairs`` ((our path, torch parameter, to_flax)) for a random
    cotangent: ``module(x)`` vs the torch ``reference(x)``."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    cot = normal(9, jax.eval_shape(lambda p: nnx.merge(graphdef, p, rest)(x), params).shape)

    def loss(p, x):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y * cot), y

    (_, out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    grads = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g_params)}
    xt = t(x).requires_grad_(True)
    out_t = reference(xt)
    (out_t * t(cot)).sum().backward()
    result = {"output": (out, out_t.detach()), "grad input": (g_x, xt.grad)}
    for path, param, to_flax in pairs:
        result[f"grad {path}"] = (grads[path], to_flax(param.grad))
    return report_diffs(result)


def peft_block(block, config, copy):
    """``get_peft_model`` on the torch copy of the un-adapted weights; ``copy(model)`` puts our adapter values in."""
    from peft import get_peft_model

    model = get_peft_model(TorchViTBlock(block), config)
    copy(model.base_model.model)
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_match_hf_peft(method):
    """huggingface/peft ``tuners/lora/layer.py`` ``Linear`` (``LoraConfig(r=8, lora_alpha=8, target_modules=
    ["query", "value"], use_dora=...)``): base(x) + (alpha/r) B A x; DoRA rescales the column-normalised kernel
    by the magnitude (the norm detached, as both do)."""
    from peft import LoraConfig

    block, _ = vit_block(method)
    params = []

    def copy(m):
        for name in ("query", "value"):
            ours, layer = getattr(block.attn, name), getattr(m, name)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(t(ours.lora_a[...]).T)
                layer.lora_B["default"].weight.copy_(t(ours.lora_b[...]).T)
                if method == "dora":
                    layer.lora_magnitude_vector["default"].weight.copy_(t(ours.magnitude[...]))
            params.extend([(f"attn/{name}/lora_a", layer.lora_A["default"].weight, lambda g: g.T),
                           (f"attn/{name}/lora_b", layer.lora_B["default"].weight, lambda g: g.T)])
            if method == "dora":
                params.append((f"attn/{name}/magnitude", layer.lora_magnitude_vector["default"].weight, lambda g: g))

    reference = peft_block(block, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                             use_dora=method == "dora"), copy)
    diffs = compare_with_package(block, reference, tokens(), params)
    assert max(diffs.values()) < 1e-5, diffs


def test_ia3_matches_hf_peft():
    """huggingface/peft ``tuners/ia3/layer.py`` ``Linear``: key and value outputs scaled, fc2's input scaled
    (``IA3Config(target_modules=["key", "value", "fc2"], feedforward_modules=["fc2"])``)."""
    from peft import IA3Config

    block, _ = vit_block("ia3")
    params = []

    def copy(m):
        for layer_name, ours in (("key", block.attn.key), ("value", block.attn.value), ("fc2", block.mlp.fc2)):
            layer = getattr(m, layer_name)
            vec = layer.ia3_l["default"]
            with torch.no_grad():
                vec.copy_(t(ours.scale[...]).reshape(vec.shape))
            prefix = "mlp" if layer_name == "fc2" else "attn"
            params.append((f"{prefix}/{layer_name}/scale", vec, lambda g: g.reshape(-1)))

    reference = peft_block(block, IA3Config(target_modules=["key", "value", "fc2"], feedforward_modules=["fc2"]),
                           copy)
    diffs = compare_with_package(block, reference, tokens(), params)
    assert max(diffs.values()) < 1e-5, diffs


def test_lora_conv_matches_hf_peft_conv2d():
    """huggingface/peft ``tuners/lora/layer.py`` ``Conv2d``: lora_A a k x k convolution with the base's stride
    and padding, lora_B a 1x1, scaled by alpha / r; here on a stride-2 3x3 (ResNet-50 v1.5's)."""
    from peft import LoraConfig, get_peft_model

    from peft_jax.adapters.lora_conv import LoRAConv

    module = LoRAConv(resnet_lib.conv(16, 32, 3, 2, nnx.Rngs(0)), 4, 8.0, rngs=nnx.Rngs(1), path=("conv",))
    perturb(module, nnx.Param, 2, std=0.1)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(oihw(module.base.kernel[...]))
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = net.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(oihw(module.lora_a[...]))
        layer.lora_B["default"].weight.copy_(t(module.lora_b[...]).T[:, :, None, None])
    x = normal(4, (2, 9, 9, 16))

    def reference(xt):
        return net(xt.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    diffs = compare_with_package(module, reference, x, [
        ("lora_a", layer.lora_A["default"].weight, lambda g: g.permute(2, 3, 1, 0)),
        ("lora_b", layer.lora_B["default"].weight, lambda g: g[:, :, 0, 0].T)])
    assert max(diffs.values()) < 1e-5, diffs
