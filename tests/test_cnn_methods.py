"""The CNN PEFT methods on the NNX ResNets: exact counts on ResNet-50, merging, adapter geometry, training."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.adapters import ADAPTER_TYPES, apply_peft, merge, param_report, trainable_filter
from peft_jax.adapters.cnn import ParallelConv, centre_tap_problem
from peft_jax.adapters.tsa import TSAConv
from peft_jax.config import base_config, with_values
from peft_jax.testing import assert_same_logits, perturb_adapters, randomize_batchnorm, train_losses
from peft_jax.testing import peft_config as peft_cfg
from peft_jax.models import create_model
from peft_jax.models import resnet as resnet_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- ResNet-50 in closed form
# He et al. 2016, Table 1: (bottleneck width, blocks) per stage; a block is 1x1 in->w, 3x3 w->w,
# 1x1 w->4w, plus a 1x1 in->4w projection in each stage's first block. 2-class head.
R50_STAGES = [(64, 3), (128, 4), (256, 6), (512, 3)]
HEAD = 2048 * 2 + 2


def r50_convs():
    """(kernel, in, out, in a residual block) for every ResNet-50 convolution."""
    convs, cin = [(7, 3, 64, False)], 64
    for w, n in R50_STAGES:
        for i in range(n):
            convs += [(1, cin, w, True), (3, w, w, True), (1, w, 4 * w, True)]
            if i == 0:
                convs.append((1, cin, 4 * w, True))
            cin = 4 * w
    return convs


CONVS = r50_convs()
BN = sum(cout for _, _, cout, _ in CONVS)  # each convolution feeds one BatchNorm
W3 = [w for w, n in R50_STAGES for _ in range(n)]  # the 3x3 of each of the 16 blocks is w -> w
FULL = sum(k * k * cin * cout for k, cin, cout, _ in CONVS) + 2 * BN + HEAD
LAST_BLOCK = 2048 * 512 + 9 * 512 * 512 + 512 * 2048 + 2 * (512 + 512 + 2048)


def test_resnet50_closed_form_agrees_with_torchvision():
    assert BN == 26_560
    assert FULL - HEAD + 2048 * 1000 + 1000 == 25_557_032  # torchvision resnet50, 1000 classes


R50_CASES = [
    ("linear", {}, HEAD),                                                    # 4,098
    ("full", {}, FULL),                                                      # 23,512,130
    ("bitfit", {}, BN + HEAD),                                               # BN betas (convs have no bias): 30,658
    ("bn_tune", {}, 2 * BN + HEAD),                                          # 57,218
    ("film", {}, 2 * BN + HEAD),                                             # 57,218
    ("ssf", {}, 2 * (BN + BN) + 2 * 2048 + HEAD),                            # every conv, BN, pooled feature: 114,434
    ("tsa", {}, sum(w * w for w in W3) + HEAD),                              # 1,261,570
    ("tsa", {"tsa_form": "channel"}, sum(W3) + HEAD),                        # 7,874
    ("tsa", {"tsa_alignment": True}, sum(w * w for w in W3) + 2048 * 2048 + HEAD),  # 5,455,874
    # a 1x1 beside each 3x3 of the blocks and beside the stem (3 -> 64, as the reference), BatchNorm affine
    ("residual_adapter", {}, sum(w * w for w in W3) + 3 * 64 + 2 * BN + HEAD),  # 1,314,882
    ("lora_conv", {}, sum(8 * (k * k * cin + cout) for k, cin, cout, blk in CONVS if blk) + HEAD),  # 637,954
    ("lora_conv", {"targets": "all"}, sum(8 * (k * k * cin + cout) for k, cin, cout, _ in CONVS) + HEAD),
    ("lora_conv", {"targets": r"layer4/\d+/conv2$", "rank": 4}, 3 * 4 * (9 * 512 + 512) + HEAD),
    # gamma 8: depth-wise 3x3 (8 inputs per group, w/8 groups) + bias, 1x1 (w/8 -> w) + bias, scale;
    # and the reference's pre-pool BatchNorm (2 x 2048)
    ("conv_adapter", {}, sum(9 * w + w // 8 + w // 8 * w + w + w for w in W3) + 2 * 2048 + HEAD),  # 207,386
    ("partial", {}, LAST_BLOCK + HEAD),                                      # layer4[2]: 4,466,690
    ("partial", {"num_blocks": 0}, HEAD),
]
R50_COUNTS = {method: expected for method, kw, expected in R50_CASES if not kw}  # default hyper-parameters


@pytest.mark.parametrize("method,kw,expected", R50_CASES)
def test_resnet50_trainable_counts(method, kw, expected):
    cfg = peft_cfg(method, **kw)
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("resnet50", num_classes=2, image_size=224, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    assert param_report(model, trainable_filter(cfg))["trainable_params"] == expected


# ----------------------------------------------------------------- merging on ResNet-18


@pytest.fixture(scope="module")
def resnet18():
    """A ResNet-18 with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    model = create_model("resnet18", num_classes=2, image_size=32, rngs=nnx.Rngs(0))
    randomize_batchnorm(model)
    return model


X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


PLAIN_TYPES = (resnet_lib.ResNet, resnet_lib.BasicBlock, resnet_lib.Downsample, resnet_lib.GlobalAvgPool,
               nnx.Conv, nnx.BatchNorm, nnx.Linear, nnx.List)


@pytest.mark.parametrize("method,kw", [
    ("ssf", {}), ("bitfit", {}), ("bn_tune", {}), ("film", {}), ("partial", {}),
    ("lora_conv", {"targets": "all"}), ("tsa", {}), ("tsa", {"tsa_form": "channel", "tsa_alignment": True}),
    ("residual_adapter", {}),
    # nested wrappers on one convolution / the pooled feature, merged inside out
    ("ssf+tsa", {"tsa_alignment": True}), ("tsa+lora_conv+film", {}),
])
def test_merge_keeps_logits_and_leaves_a_plain_resnet(resnet18, method, kw):
    model, cfg = nnx.clone(resnet18), peft_cfg(method, **kw)
    apply_peft(model, cfg, rngs=nnx.Rngs(1))
    perturb_adapters(model)
    before = model(X)
    merge(model, cfg)
    assert_same_logits(model(X), before)
    assert not jax.tree.leaves(nnx.state(model, nnx.Any(*ADAPTER_TYPES)))
    assert all(isinstance(m, PLAIN_TYPES) for _, m in nnx.iter_modules(model))
    assert not any(v.has_metadata("peft_tune") for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_conv_adapter_does_not_merge():
    cfg = peft_cfg("conv_adapter")
    model = nnx.eval_shape(lambda: apply_peft(create_model("resnet18", num_classes=2, rngs=nnx.Rngs(0)), cfg,
                                              rngs=nnx.Rngs(1)))  # refused before any value is read
    with pytest.raises(ValueError, match="'conv_adapter' adds modules that cannot be merged"):
        merge(model, cfg)


@pytest.mark.parametrize("method,kw,tol", [
    ("ssf", {}, 0.0), ("film", {}, 0.0), ("lora_conv", {"targets": "all"}, 0.0),
    ("tsa", {"tsa_alignment": True}, 1e-2),  # the reference's 1e-4 x identity: nearly the backbone
])
def test_identity_like_initialisation(resnet18, method, kw, tol):
    base = resnet18(X)
    model = nnx.clone(resnet18)
    apply_peft(model, peft_cfg(method, **kw), rngs=nnx.Rngs(1))
    np.testing.assert_allclose(model(X), base, rtol=0, atol=max(tol, 1e-6) * float(jnp.abs(base).max()))


def test_tsa_init_follows_the_reference(resnet18):
    model = nnx.clone(resnet18)
    apply_peft(model, peft_cfg("tsa", tsa_form="channel"))
    adapted = [p for p, m in nnx.iter_modules(model) if isinstance(m, TSAConv)]
    # every 3x3 convolution of the blocks (both of each basic block), not the stem or the 1x1 shortcuts
    assert sorted("/".join(map(str, p)) for p in adapted) == sorted(
        f"layer{s}/{b}/conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2))
    np.testing.assert_array_equal(model.layer1[0].conv1.alpha[...], np.full(64, 1e-4, np.float32))
    # a convolution that changes the channel count takes the matrix form, as in the reference
    np.testing.assert_array_equal(model.layer2[0].conv1.alpha[...], 1e-4 * np.eye(64, 128, dtype=np.float32))


@pytest.mark.parametrize("form", ["matrix", "channel"])
def test_parallel_adapter_folds_into_a_strided_centre_tap(form):
    """ResNet-50's v1.5 bottleneck: a stride-2 3x3 convolution with as many inputs as outputs."""
    conv = resnet_lib.conv(16, 16, 3, 2, nnx.Rngs(0))
    alpha = jax.random.normal(jax.random.key(1), (16, 16) if form == "matrix" else (16,))
    wrapped = TSAConv(conv, alpha, what="test", path=("conv",))
    x = jax.random.normal(jax.random.key(2), (2, 15, 15, 16))  # odd size: strided output is ceil(15 / 2)
    before = wrapped(x)
    assert before.shape == (2, 8, 8, 16)
    assert_same_logits(wrapped.fold()(x), before)


def test_parallel_adapter_refuses_misaligned_convolutions():
    rngs = nnx.Rngs(0)
    assert centre_tap_problem(nnx.Conv(4, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)) is None
    assert centre_tap_problem(nnx.Conv(4, 4, (1, 1), strides=2, padding="VALID", rngs=rngs)) is None
    # TF "SAME" (asymmetric at stride 2) and "VALID" centre taps are found per call (test_efficientnet_methods.py)
    assert centre_tap_problem(nnx.Conv(4, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)) is None
    assert centre_tap_problem(nnx.Conv(4, 4, (3, 3), padding="VALID", feature_group_count=4, rngs=rngs)) is None
    for bad, reason in [
        (nnx.Conv(4, 4, (3, 3), padding=((2, 2), (1, 1)), rngs=rngs), "padding"),  # some centre taps read padding
        (nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", rngs=rngs), "padding"),
        (nnx.Conv(4, 4, (2, 2), padding="SAME", rngs=rngs), "no centre tap"),
        (nnx.Conv(4, 4, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, rngs=rngs), "grouped"),
    ]:
        assert reason in centre_tap_problem(bad)
        with pytest.raises(ValueError, match="cannot put a parallel 1x1 adapter"):
            ParallelConv(bad, jnp.zeros((4,)), what="tsa", path=("x",))


# ----------------------------------------------------------------- what trains


def trainable_paths(method, **kw):
    cfg = peft_cfg(method, **kw)
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("resnet18", num_classes=2, image_size=32, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))}


def test_partial_trains_exactly_the_last_blocks():
    paths = trainable_paths("partial", num_blocks=3)  # ResNet-18: layer3[1], layer4[0], layer4[1]
    assert {p.split("/")[0] + "/" + p.split("/")[1] for p in paths if not p.startswith("head/")} == {
        "layer3/1", "layer4/0", "layer4/1"}
    assert "layer4/0/downsample/conv/kernel" in paths and "layer3/0/conv1/kernel" not in paths
    with pytest.raises(ValueError, match="between 0 and the model's 8 residual blocks"):
        trainable_paths("partial", num_blocks=9)


def test_bitfit_and_bn_tune_select_batchnorm_affine_and_head():
    bn = trainable_paths("bn_tune")
    assert all(p.startswith("head/") or p.endswith(("/scale", "/bias")) for p in bn)
    assert "layer2/0/downsample/bn/scale" in bn and "bn1/bias" in bn and len(bn) == 2 * 20 + 2
    assert trainable_paths("bitfit") == {p for p in bn if p.endswith("bias") or p.startswith("head/")}


def test_lora_conv_targets():
    default = trainable_paths("lora_conv")  # the config's "qv" names no convolution: the "blocks" preset
    assert "layer1/0/conv1/lora_a" in default and "layer2/0/downsample/conv/lora_b" in default
    assert "conv1/lora_a" not in default and "conv1/lora_a" in trainable_paths("lora_conv", targets="all")
    with pytest.raises(ValueError, match=r"lora_conv \(peft.targets\): no Conv module matches"):
        trainable_paths("lora_conv", targets=r"nowhere$")


def test_cnn_methods_refuse_a_vit():
    model = create_model("vit_ti16", num_classes=2, image_size=32, patch_size=8, depth=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"applies to CNN \(ResNet, EfficientNet-Lite\) models, not ViT"):
        apply_peft(model, peft_cfg("tsa"))


def test_bad_hyper_parameters_are_errors():
    with pytest.raises(ValueError, match="peft.tsa_form must be one of"):
        trainable_paths("tsa", tsa_form="diagonal")
    with pytest.raises(ValueError, match="peft.reduction=3 must divide the 64 input channels"):
        trainable_paths("conv_adapter", reduction=3)


# ----------------------------------------------------------------- training on BreastMNIST

CNN_METHODS = ["ssf", "bitfit", "bn_tune", "film", "tsa", "lora_conv", "conv_adapter", "residual_adapter", "partial"]
# configs/resnet50_ssf.py as the command line below sets it: ResNet-18 at 28 px, 20 steps at lr 1e-2.
RESNET18_RUN = {"model.name": "resnet18", "model.image_size": 28, "dataset.name": "breastmnist",
                "train.num_steps": 20, "train.batch_size": 16, "train.lr": 1e-2, "train.warmup_steps": 2,
                "train.log_every": 1, "train.eval_every": 20, "train.eval_batch_size": 256, "train.progress": False}


def assert_trained(workdir: pathlib.Path, method: str) -> None:
    losses = train_losses(workdir)
    assert len(losses) == 20 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert json.loads((workdir / "results.json").read_text())["method"] == method


@pytest.mark.parametrize("method", [m for m in CNN_METHODS if m != "ssf"])
def test_method_trains_on_breastmnist(shared_data, tmp_path, method):
    """The train loop in-process, one run per method (ssf: through launch/train.py, below)."""
    from peft_jax.train import classify

    classify.train_and_evaluate(with_values(base_config(), {**RESNET18_RUN, "peft.method": method}), tmp_path)
    assert_trained(tmp_path, method)


def test_ssf_trains_on_breastmnist_through_launch(shared_data, tmp_path):
    """The same run from the command line: the config file, its overrides and the launcher."""
    flags = [f"--config.{key}={value}" for key, value in RESNET18_RUN.items()]
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs' / 'resnet50_ssf.py'}",
           *flags, f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PEFT_JAX_TCMALLOC="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_trained(tmp_path, "ssf")


@pytest.mark.parametrize("method", CNN_METHODS)
def test_resnet50_train_step_lowers(method):
    """Every method's ResNet-50 train step (bottleneck blocks: the ResNet-18 runs above train basic blocks) traces
    and lowers, with the closed-form trainable count; compiling all nine would cost minutes and check nothing more."""
    from peft_jax.train import classify

    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.train.batch_size = "resnet50", 64, 2
    cfg.peft.method = method
    lowered, _, report = classify.lower_train_step(cfg)
    assert report["trainable_params"] == R50_COUNTS[method]
    assert "convolution" in lowered.as_text()


def test_resnet50_dry_run(tmp_path):
    """``--config.dry_run`` compiles the step; its arguments are the frozen, trainable and optimizer state plus the
    BatchNorm statistics and the batch (under 1 MB here): nothing is copied or replicated by mistake."""
    from peft_jax.train import classify

    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.train.batch_size = "resnet50", 64, 2
    cfg.peft.method = "ssf"
    result = classify.dry_run(cfg, tmp_path)
    assert result["trainable_params"] == R50_COUNTS["ssf"]
    state = sum(result[k] for k in ("frozen_bytes_per_device", "trainable_bytes_per_device", "optimizer_bytes_per_device"))
    assert state <= result["memory_analysis"]["argument_size_in_bytes"] < state + 2**20
    assert (tmp_path / "dry_run.json").is_file()
