"""ResNet structure, parameter counts, BatchNorm modes and torch numerics of its parts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from peft_jax.models.resnet import RESNET_DEPTHS, BasicBlock, Bottleneck, Downsample, ResNet, max_pool_3x3_s2

# torchvision resnet{18,34,50,101}(num_classes=1000) parameter counts.
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


def num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("depth", sorted(RESNET_DEPTHS))
def test_parameter_count_matches_torch_reference(depth):
    from transformers import ResNetConfig, ResNetForImageClassification

    kind, blocks = RESNET_DEPTHS[depth]
    widths = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
    ref = ResNetForImageClassification(
        ResNetConfig(layer_type=kind, depths=list(blocks), hidden_sizes=widths, num_labels=1000)
    )
    torch_count = sum(p.numel() for p in ref.parameters())
    model = nnx.eval_shape(lambda: ResNet(depth, num_classes=1000, rngs=nnx.Rngs(0)))
    assert num_params(model) == torch_count == TORCHVISION_COUNTS[depth]


def test_structure_and_names():
    model = nnx.eval_shape(lambda: ResNet(50, num_classes=7, rngs=nnx.Rngs(0)))
    assert model.num_features == 2048 and model.num_classes == 7
    assert model.conv1.kernel.shape == (7, 7, 3, 64)
    assert model.head.kernel.shape == (2048, 7)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    first = model.layer2[0]
    assert isinstance(first, Bottleneck) and isinstance(first.downsample, Downsample)
    assert first.conv1.strides == (1, 1) and first.conv2.strides == (2, 2)  # v1.5: stride on the 3x3
    assert first.downsample.conv.strides == (2, 2)
    assert model.layer2[1].downsample is None
    assert isinstance(model.layer1[0].downsample, Downsample)  # 64 -> 256 channels, stride 1

    small = nnx.eval_shape(lambda: ResNet(18, num_classes=3, rngs=nnx.Rngs(0)))
    assert small.num_features == 512
    assert isinstance(small.layer1[0], BasicBlock) and small.layer1[0].downsample is None
    assert small.layer3[0].conv1.strides == (2, 2)


def test_unknown_depth_is_an_error():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(42, rngs=nnx.Rngs(0))


def test_forward_shapes_and_features():
    model = ResNet(18, num_classes=5, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    feats = nnx.jit(lambda m, x: m.features(x))(model, x)
    assert feats.shape == (2, 512)
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, model.head(feats), rtol=1e-6, atol=1e-6)


def test_initialisation_follows_torchvision():
    model = ResNet(18, num_classes=10, rngs=nnx.Rngs(0))
    k = np.asarray(model.layer3[1].conv2.kernel[...])  # 3x3, 256 -> 256: fan_out = 9 * 256
    assert abs(k.std() - np.sqrt(2.0 / (9 * 256))) < 0.02 * np.sqrt(2.0 / (9 * 256))
    assert abs(k.mean()) < 1e-3
    assert np.abs(k).max() > 3.5 * k.std()  # untruncated normal
    bn = model.layer1[0].bn2
    np.testing.assert_array_equal(bn.scale[...], 1.0)
    np.testing.assert_array_equal(bn.bias[...], 0.0)
    bound = 1 / np.sqrt(512)
    for w in (model.head.kernel[...], model.head.bias[...]):
        assert np.abs(np.asarray(w)).max() <= bound


def test_batchnorm_train_updates_statistics_and_eval_uses_them():
    model = ResNet(18, num_classes=4, rngs=nnx.Rngs(0))
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    forward = nnx.jit(lambda m, x: m(x))
    model.eval()
    before = forward(model, x)
    mean0 = np.asarray(model.bn1.mean[...]).copy()
    np.testing.assert_array_equal(forward(model, x), before)  # eval: deterministic, no update
    np.testing.assert_array_equal(model.bn1.mean[...], mean0)

    model.train()
    forward(model, x)
    mean1 = np.asarray(model.bn1.mean[...])
    assert not np.allclose(mean1, mean0)
    # Flax momentum 0.9 == torch momentum 0.1: new = 0.9 * old + 0.1 * batch mean.
    h = model.conv1(x)
    np.testing.assert_allclose(mean1, 0.9 * mean0 + 0.1 * np.asarray(h.mean(axis=(0, 1, 2))), rtol=1e-4, atol=1e-5)

    model.eval()
    after = forward(model, x)
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(forward(model, x), after)


def test_batch_statistics_are_not_parameters():
    model = nnx.eval_shape(lambda: ResNet(18, rngs=nnx.Rngs(0)))
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 1 + 2 * 8 + 3  # stem, two per block, three projection shortcuts
    stats = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert stats == sum(bn.mean.size + bn.var.size for bn in bns)


def test_max_pool_pads_with_minus_infinity_like_torch():
    x = -5.0 - np.random.default_rng(0).random((2, 9, 10, 3), dtype=np.float32)
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, stride=2, padding=1)
    np.testing.assert_array_equal(max_pool_3x3_s2(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy())


def test_stride2_convolution_padding_matches_torch():
    model = ResNet(18, num_classes=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 15, 15, 3)).astype(np.float32)  # odd size: asymmetric 'SAME' would differ
    w = np.asarray(model.conv1.kernel[...])
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), stride=2, padding=3
    )
    np.testing.assert_allclose(model.conv1(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_convolution_and_its_gradients_match_torch(stride):
    """1x1 convolutions run as products with their own backward pass (``channel_product``)."""
    from peft_jax.models.resnet import pointwise_conv

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 7, 5)).astype(np.float32)
    w = rng.standard_normal((1, 1, 5, 3)).astype(np.float32)
    probe = rng.standard_normal((2, 4 if stride == 2 else 7, 4 if stride == 2 else 7, 3)).astype(np.float32)

    def loss(x, w):
        return (jnp.tanh(pointwise_conv(x, w, (stride, stride))) * probe).sum()

    value, (gx, gw) = jax.value_and_grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(w))
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    ref = (torch.tanh(torch.nn.functional.conv2d(tx, tw, stride=stride)) * torch.from_numpy(probe).permute(0, 3, 1, 2)).sum()
    ref.backward()
    np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(gx, tx.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, tw.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-5, atol=1e-5)
