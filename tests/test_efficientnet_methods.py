"""The CNN PEFT methods on EfficientNet-Lite: placement in the inverted-residual blocks, exact counts on
Lite0 in closed form, identity at initialisation, merging (folds into depth-wise kernels included),
combinations, and a training run per method on BreastMNIST through the real train loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from peft_jax.adapters import ADAPTER_TYPES, apply_peft, merge, param_report, trainable_filter
from peft_jax.adapters.cnn import ParallelConv
from peft_jax.adapters.conv_adapter import ConvAdapterMBConv
from peft_jax.adapters.lora_conv import LoRAConv
from peft_jax.adapters.residual_adapter import ResidualAdapterConv
from peft_jax.adapters.tsa import TSAConv
from peft_jax.config import base_config
from peft_jax.models import create_model
from peft_jax.models import efficientnet as effnet
from peft_jax.train import builder, classify
from peft_jax.testing import assert_same_logits, perturb_adapters, randomize_batchnorm, train_losses
from peft_jax.testing import peft_config as peft_cfg

# ----------------------------------------------------------------- Lite0 in closed form
# The torch definition's block arguments (efficientnet-lite-pytorch, as the TF release):
# repeats, kernel, stride, expansion, input and output channels; stem 32 and head 1280 fixed in Lite.
LITE0_ARGS = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
              "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320")


def lite0_blocks():
    """(input, hidden, output channels, kernel, expansion) of each of Lite0's 16 MBConv blocks."""
    blocks = []
    for arg in LITE0_ARGS:
        f = {part[0]: part[1:] for part in arg.split("_")}
        r, k, e, cin, cout = int(f["r"]), int(f["k"]), int(f["e"]), int(f["i"]), int(f["o"])
        for j in range(r):
            c = cin if j == 0 else cout
            blocks.append((c, c * e, cout, k, e))
    return blocks


BLOCKS = lite0_blocks()
STEM, TOP = 32, 1280
HEAD = TOP * 2 + 2
# Convolutions as (kernel, in, out, groups, role); every one feeds one BatchNorm.
CONVS = [(3, 3, STEM, 1, "stem")]
for cin, mid, cout, k, e in BLOCKS:
    CONVS += [(1, cin, mid, 1, "expand")] if e != 1 else []
    CONVS += [(k, mid, mid, mid, "depthwise"), (1, mid, cout, 1, "project")]
CONVS.append((1, BLOCKS[-1][2], TOP, 1, "head"))
BN = sum(cout for _, _, cout, _, _ in CONVS)
FULL = sum(k * k * cin // g * cout for k, cin, cout, g, _ in CONVS) + 2 * BN + HEAD
MIDS = [mid for _, mid, _, _, _ in BLOCKS]  # the depth-wise convolutions' channels


def lora(k, cin, cout, rank=8):
    return rank * (k * k * cin + cout)


LAST = BLOCKS[-1]  # 192 -> 1152 -> 320: expand, depth-wise, project and three BatchNorms, then conv_head + bn1
LAST_BLOCK = LAST[0] * LAST[1] + 2 * LAST[1] + LAST[3] ** 2 * LAST[1] + 2 * LAST[1] + LAST[1] * LAST[2] + 2 * LAST[2]
ABOVE = LAST[2] * TOP + 2 * TOP


def test_lite0_closed_form_agrees_with_the_reference():
    assert len(BLOCKS) == 16 and sum(MIDS) == 8_960
    assert FULL - HEAD + TOP * 1000 + 1000 == 4_652_008  # efficientnet-lite0, 1000 classes


LITE0_CASES = [
    ("linear", {}, HEAD),                                                          # 2,562
    ("full", {}, FULL),                                                            # 3,373,570
    ("bitfit", {}, BN + HEAD),                                                     # BN betas: 23,570
    ("bn_tune", {}, 2 * BN + HEAD),                                                # 44,578
    ("film", {}, 2 * BN + HEAD),                                                   # 44,578
    ("ssf", {}, 2 * (BN + BN) + 2 * TOP + HEAD),                                   # 89,154
    ("tsa", {}, sum(MIDS) + HEAD),                            # per channel beside each depth-wise conv: 11,522
    ("tsa", {"tsa_form": "channel"}, sum(MIDS) + HEAD),
    ("tsa", {"tsa_alignment": True}, sum(MIDS) + TOP * TOP + HEAD),                # 1,649,922
    # per channel beside each depth-wise conv, a dense 3 x 32 beside the stem, BatchNorm affine: 53,634
    ("residual_adapter", {}, sum(MIDS) + 3 * STEM + 2 * BN + HEAD),
    ("lora_conv", {}, sum(lora(k, i, o) for k, i, o, g, role in CONVS if role in ("expand", "project")) + HEAD),
    ("lora_conv", {"targets": "all"}, sum(lora(k, i, o) for k, i, o, g, _ in CONVS if g == 1) + HEAD),
    # gamma 8, expanded blocks only: grouped 1x1 (C_in weights) + bias, 1x1 (C_in/8 -> C_out) + bias, scale: 38,708
    ("conv_adapter", {}, sum(c + c // 8 + c // 8 * o + 2 * o for c, _, o, _, e in BLOCKS if e != 1) + HEAD),
    ("partial", {}, LAST_BLOCK + ABOVE + HEAD),                                    # blocks/15 + conv_head: 1,020,162
    ("partial", {"num_blocks": 0}, HEAD),
    ("ssf+tsa", {}, 2 * (BN + BN) + 2 * TOP + sum(MIDS) + HEAD),
]
LITE0_COUNTS = {method: expected for method, kw, expected in LITE0_CASES if not kw}


def build(method, **kw):
    """The shapes of a Lite0 with the method applied, and its config."""
    cfg = peft_cfg(method, **kw)
    return nnx.eval_shape(lambda: apply_peft(
        create_model("efficientnet_lite0", num_classes=2, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))), cfg


@pytest.mark.parametrize("method,kw,expected", LITE0_CASES)
def test_lite0_trainable_counts(method, kw, expected):
    model, cfg = build(method, **kw)
    assert param_report(model, trainable_filter(cfg))["trainable_params"] == expected


def adapted_paths(method, wrapper, **kw):
    model, _ = build(method, **kw)
    return sorted("/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, wrapper))


def test_tsa_sits_beside_the_depthwise_convolutions_only():
    assert adapted_paths("tsa", TSAConv) == sorted(f"blocks/{i}/depthwise_conv" for i in range(16))
    model, _ = build("tsa", tsa_form="matrix")
    assert model.blocks[3].depthwise_conv.alpha.shape == (144,)  # per channel in the matrix form too


def test_residual_adapters_sit_beside_the_depthwise_convolutions_and_the_stem():
    assert adapted_paths("residual_adapter", ResidualAdapterConv) == sorted(
        [f"blocks/{i}/depthwise_conv" for i in range(16)] + ["conv_stem"])
    model, _ = build("residual_adapter")
    assert model.blocks[3].depthwise_conv.alpha.shape == (144,) and model.conv_stem.alpha.shape == (3, 32)


def test_conv_adapter_sits_beside_each_expanded_block():
    assert adapted_paths("conv_adapter", ConvAdapterMBConv) == sorted(f"blocks/{i}" for i in range(1, 16))
    model, _ = build("conv_adapter")
    assert isinstance(model.pool, effnet.GlobalAvgPool)  # no pre-pool BatchNorm: the reference's EfficientNet has none
    assert model.blocks[1].adapter.down_kernel.shape == (1, 1, 8, 2)  # 16 inputs, groups of 8


def test_conv_adapter_matches_the_reference_inverted_residual(lite0):
    """Hhhhhhao/Conv-Adapter ``InvertedResidual.forward``: block(x) + se * conv2(act(conv1(x))), written in torch."""
    torch = pytest.importorskip("torch")
    model = nnx.clone(lite0)
    apply_peft(model, peft_cfg("conv_adapter"), rngs=nnx.Rngs(1))
    perturb_adapters(model)
    wrapped = model.blocks[3]  # 24 -> 40, 5x5 depth-wise, stride 2
    x = jax.random.normal(jax.random.key(3), (2, 15, 16, 24))
    a = wrapped.adapter

    def t(v):
        return torch.from_numpy(np.array(v[...]))

    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    h = torch.nn.functional.conv2d(xt, t(a.down_kernel).permute(3, 2, 0, 1), t(a.down_bias), stride=2, groups=3)
    h = torch.nn.functional.conv2d(torch.nn.functional.relu6(h), t(a.up_kernel).T[:, :, None, None], t(a.up_bias))
    expected = np.asarray(wrapped.base(x)) + (h * t(a.adapter_scale)[None, :, None, None]).permute(0, 2, 3, 1).numpy()
    assert_same_logits(np.asarray(wrapped(x)), expected)


def test_lora_conv_presets_skip_depthwise_convolutions():
    roles = {"expand_conv", "project_conv"}
    blocks = adapted_paths("lora_conv", LoRAConv)
    assert blocks == sorted(f"blocks/{i}/{c}" for i in range(16) for c in roles if i or c != "expand_conv")
    assert adapted_paths("lora_conv", LoRAConv, targets="all") == sorted(blocks + ["conv_stem", "conv_head"])
    with pytest.raises(ValueError, match=r"blocks/0/depthwise_conv is a grouped"):
        build("lora_conv", targets=r"depthwise_conv$")


def test_partial_trains_the_top_of_the_network():
    model, cfg = build("partial", num_blocks=2)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))}
    assert {p.rsplit("/", 2)[0] if p.startswith("blocks/") else p.split("/")[0] for p in paths} == {
        "blocks/14", "blocks/15", "conv_head", "bn1", "head"}
    with pytest.raises(ValueError, match="between 0 and the model's 16 residual blocks"):
        build("partial", num_blocks=17)


# ----------------------------------------------------------------- identity at start, merging


@pytest.fixture(scope="module")
def lite0():
    """A Lite0 with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    model = create_model("efficientnet_lite0", num_classes=2, image_size=32, rngs=nnx.Rngs(0))
    randomize_batchnorm(model)
    return model


# Odd and even sizes: TF "SAME" pads a stride-2 convolution of an even size one more at the bottom/right.
X = jax.random.normal(jax.random.key(0), (2, 35, 32, 3))
PLAIN_TYPES = (effnet.EfficientNet, effnet.MBConvBlock, effnet.GlobalAvgPool, nnx.Conv, nnx.BatchNorm, nnx.Linear,
               nnx.Dropout, nnx.List)
MERGED = [("ssf", {}), ("film", {}), ("bitfit", {}), ("bn_tune", {}), ("partial", {}), ("tsa", {"tsa_alignment": True}),
          ("residual_adapter", {}), ("lora_conv", {"targets": "all"}), ("ssf+tsa", {}), ("bitfit+lora_conv", {}),
          ("tsa+lora_conv+film", {})]


@pytest.mark.parametrize("method,kw", MERGED)
def test_merge_keeps_logits_and_leaves_a_plain_efficientnet(lite0, method, kw):
    model, cfg = nnx.clone(lite0), peft_cfg(method, **kw)
    apply_peft(model, cfg, rngs=nnx.Rngs(1))
    perturb_adapters(model)
    before = model(X)
    if jax.tree.leaves(nnx.state(model, nnx.Any(*ADAPTER_TYPES))):  # the perturbed adapters change the logits
        assert float(jnp.abs(before - lite0(X)).max()) > 1e-3 * float(jnp.abs(before).max())
    merge(model, cfg)
    assert_same_logits(model(X), before)
    assert not jax.tree.leaves(nnx.state(model, nnx.Any(*ADAPTER_TYPES)))
    assert all(isinstance(m, PLAIN_TYPES) for _, m in nnx.iter_modules(model))


@pytest.mark.parametrize("method,kw,tol", [
    ("ssf", {}, 0.0), ("film", {}, 0.0), ("lora_conv", {"targets": "all"}, 0.0), ("bitfit+lora_conv", {}, 0.0),
    ("tsa", {"tsa_alignment": True}, 1e-2),  # the reference's 1e-4 scale: nearly the backbone
])
def test_identity_like_initialisation(lite0, method, kw, tol):
    base = lite0(X)
    model = nnx.clone(lite0)
    apply_peft(model, peft_cfg(method, **kw), rngs=nnx.Rngs(1))
    if method == "tsa":
        np.testing.assert_array_equal(model.blocks[3].depthwise_conv.alpha[...], np.full(144, 1e-4, np.float32))
    np.testing.assert_allclose(model(X), base, rtol=0, atol=max(tol, 1e-6) * float(jnp.abs(base).max()))


@pytest.mark.parametrize("kernel,size", [(3, 16), (3, 15), (5, 16), (5, 17)])
@pytest.mark.parametrize("depthwise", [True, False])
def test_parallel_adapter_folds_into_a_same_padded_strided_centre_tap(kernel, size, depthwise):
    """TF "SAME" at stride 2: the centre tap's offset follows the input size; depth-wise kernels fold per channel."""
    c = 8
    conv = effnet.conv(c, c, kernel, 2, nnx.Rngs(0), groups=c if depthwise else 1)
    alpha = jax.random.normal(jax.random.key(1), (c,) if depthwise else (c, c))
    wrapped = ParallelConv(conv, alpha, what="test", path=("conv",))
    x = jax.random.normal(jax.random.key(2), (2, size, size + 1, c))
    before = wrapped(x)
    assert before.shape == (2, -(-size // 2), -(-(size + 1) // 2), c)
    assert_same_logits(wrapped.fold()(x), before)


def test_a_dense_adapter_is_refused_beside_a_depthwise_convolution():
    conv = effnet.conv(8, 8, 3, 1, nnx.Rngs(0), groups=8)
    with pytest.raises(ValueError, match="depth-wise, so its adapter is one weight per channel"):
        ParallelConv(conv, jnp.zeros((8, 8)), what="tsa", path=("conv",))


# ----------------------------------------------------------------- training on BreastMNIST

TRAIN_METHODS = ["linear", "full", "bitfit", "bn_tune", "film", "ssf", "tsa", "lora_conv", "residual_adapter",
                 "conv_adapter", "partial", "ssf+tsa"]
# Learning rates at which 20 steps from random weights lower the loss steadily (1e-3 when not named); at 1e-2
# the methods that scale whole channels (SSF, the BatchNorm ones) overshoot and the loss rises.
LR = {"tsa": 1e-2, "lora_conv": 3e-3, "conv_adapter": 3e-3}


def lite0_experiment(method):
    c = base_config()
    c.model.name, c.model.image_size = "efficientnet_lite0", 32
    c.dataset.name = "breastmnist"
    c.peft.method = method
    c.train.update(num_steps=20, batch_size=16, lr=LR.get(method, 1e-3), warmup_steps=2, log_every=1,
                   eval_every=20, eval_batch_size=256, progress=False)
    return c


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_method_trains_on_breastmnist(shared_data, tmp_path, method):
    cfg = lite0_experiment(method)
    results = classify.train_and_evaluate(cfg, tmp_path)
    losses = train_losses(tmp_path)  # metrics.jsonl
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < losses[0], losses
    assert results["trainable_params"] == LITE0_COUNTS[method]
    # Every trainable variable moved: the adapter file against the initial model.
    built = builder.build(cfg, 2)
    initial = {f"params/{'/'.join(map(str, p))}": np.asarray(v.get_value())
               for p, v in nnx.to_flat_state(nnx.state(built.model, built.trainable))}
    trained = {k: v for k, v in load_file(str(tmp_path / "adapter" / "adapter.safetensors")).items()
               if k.startswith("params/")}
    assert set(trained) == set(initial)
    assert [k for k in trained if np.array_equal(trained[k], initial[k])] == []
