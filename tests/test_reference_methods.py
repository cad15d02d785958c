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


def torch_vit_block(block, w, x, linear, mlp_act=None):
    """timm ``Block.forward`` (pre-norm) in torch; ``linear(name, h)`` computes each projection."""
    d, heads = x.shape[-1], block.attn.num_heads if hasattr(block, "attn") else block.base.attn.num_heads
    eps = block.norm1.epsilon
    mlp_act = mlp_act or (lambda h: F.gelu(h, approximate="tanh" if block.mlp.approximate else "none"))
    h = F.layer_norm(x, (d,), w["norm1/scale"], w["norm1/bias"], eps)
    b, n, _ = h.shape
    q, k, v = (linear(f"attn/{p}", h).reshape(b, n, heads, d // heads).transpose(1, 2)
               for p in ("query", "key", "value"))
    att = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5).softmax(-1)
    x = x + linear("attn/out", (att @ v).transpose(1, 2).reshape(b, n, d))
    h = F.layer_norm(x, (d,), w["norm2/scale"], w["norm2/bias"], eps)
    return x + linear("mlp/fc2", mlp_act(linear("mlp/fc1", h)))


def compare_tokens(module, reference, x):
    """``module(x)`` vs ``reference(w, x)`` (``w``: torch leaves of every parameter): output, input
    gradient and the gradient of every parameter, for a random cotangent; relative differences."""
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

    diffs = compare_tokens(block, lambda w, x: torch_vit_block(block, w, x, lambda n, h: linear(w, n, h)), tokens())
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
        block, lambda w, x: torch_vit_block(block, w, x, lambda n, h: fact_tk_reference_linear(w, n, h, form)),
        tokens())
    assert max(diffs.values()) < 1e-5, diffs


def test_fact_tk_forms_differ_and_merge():
    """The two MLP definitions are different functions of the same parameters; both fold into the kernels."""
    from peft_jax.adapters import merge

    x = tokens()
    outs = {}
    for form in ("official", "paper"):
        block, cfg = vit_block("fact_tk", fact_tk_mlp=form, dropout=0.0)
        outs[form] = block(x)
    assert float(jnp.abs(outs["official"] - outs["paper"]).max()) > 1e-3
    with pytest.raises(ValueError, match="peft.fact_tk_mlp must be one of"):
        vit_block("fact_tk", fact_tk_mlp="tucker")
