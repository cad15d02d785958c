"""U-Net PEFT methods: exact trainable counts on SD 1.5 (closed form, abstract model) and behaviour on a tiny U-Net."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from peft_jax.adapters import apply_peft, merge, param_report, trainable_filter
from peft_jax.models.diffusion import UNet2DConditionModel, UNetConfig
from peft_jax.testing import nudge

LORA_TARGETS = r"attn[12]/(to_q|to_k|to_v|to_out)$"

# SD 1.5: block widths, cross-attention width, time-embedding width.
CH, D, T = (320, 640, 1280, 1280), 768, 1280
# (cin, cout) of every ResNet block: down path, mid block, up path (input + skip channels).
RESNETS = ([(320, 320), (320, 320), (320, 640), (640, 640), (640, 1280), (1280, 1280), (1280, 1280), (1280, 1280)]
           + [(1280, 1280)] * 2
           + [(2560, 1280)] * 3 + [(2560, 1280), (2560, 1280), (1920, 1280)]
           + [(1920, 640), (1280, 640), (960, 640)] + [(960, 320), (640, 320), (640, 320)])
TRANSFORMERS = [320, 320, 640, 640, 1280, 1280] + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
SAMPLERS = [320, 640, 1280] + [1280, 1280, 640]  # downsample and upsample 3x3 convs


def _resnet(cin, cout):
    """(params, biases, norm params, svdiff singular values (one per GroupNorm too)) of one ResNet block."""
    short = cin != cout
    params = 2 * cin + 9 * cin * cout + cout + T * cout + cout + 2 * cout + 9 * cout * cout + cout
    params += (cin * cout + cout) * short
    return params, 4 * cout + cin + cout * short, 2 * cin + 2 * cout, 3 * cout + min(cin, cout) * short + 2


def _transformer(c):
    """(params, biases, norm params, attention params, svdiff values, LoRA-per-rank, DiffFit scales).

    SVDiff: one value per GroupNorm / LayerNorm too (4). DiffFit: the three branch scales and, per
    attention, the reference processor's gamma_q, gamma_k, gamma_v and gamma_fnn (2 x 4)."""
    attention = 6 * c * c + 2 * D * c + 2 * c
    params = 2 * c + 2 * (c * c + c) + 6 * c + attention + (8 * c * c + 8 * c) + (4 * c * c + c)
    svd = 2 * c + 4 * c + 2 * c + 2 * min(D, c) + 2 * c + 4
    return params, 17 * c, 8 * c, attention, svd, 14 * c + 2 * D, 3 * c + 8 * c


def _totals():
    ends = dict(params=9 * 4 * 320 + 320 + 320 * T + T + T * T + T + 640 + 9 * 320 * 4 + 4,
                bias=320 + 2 * T + 320 + 4, norm=640, svd=36 + 320 + T + 4 + 1)
    out = dict(ends, attention=0, attention_blocks=0, lora=0, difffit_scales=0)
    for cin, cout in RESNETS:
        p, b, n, s = _resnet(cin, cout)
        out["params"] += p; out["bias"] += b; out["norm"] += n; out["svd"] += s  # noqa: E702
    for c in TRANSFORMERS:
        p, b, n, a, s, lora, scales = _transformer(c)
        out["params"] += p; out["bias"] += b; out["norm"] += n; out["attention"] += a  # noqa: E702
        out["svd"] += s; out["lora"] += lora; out["difffit_scales"] += scales  # noqa: E702
        out["attention_blocks"] += p
    for c in SAMPLERS:
        out["params"] += 9 * c * c + c; out["bias"] += c; out["svd"] += c  # noqa: E702
    return out


TOTALS = _totals()
NORM_BIAS = TOTALS["bias"] + TOTALS["norm"] // 2  # norm biases are biases already: add the scales
EXPECTED = {
    "full": TOTALS["params"],
    # The reference's "attentions" in the name: every parameter of the 16 Transformer2DModels.
    "attention": TOTALS["attention_blocks"],
    "bias": TOTALS["bias"],
    "norm": TOTALS["norm"],
    "norm_bias": NORM_BIAS,
    # A Transformer2DModel's 17c biases and 4c norm scales are both attention and norm/bias parameters: counted once.
    "norm_bias_attention": NORM_BIAS + TOTALS["attention_blocks"] - sum(21 * c for c in TRANSFORMERS),
    "lora": 4 * TOTALS["lora"],
    "svdiff": TOTALS["svd"],
    "difffit": NORM_BIAS + TOTALS["difffit_scales"],
}


def _cfg(method, **kw):
    return ml_collections.ConfigDict({"method": method, "rank": 4, "alpha": 4.0, "targets": None, **kw})


@pytest.fixture(scope="module")
def sd15():
    """The SD 1.5 U-Net, abstract: shapes only, nothing allocated."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig(), rngs=nnx.Rngs(0)))


def test_sd15_total_matches_the_published_size(sd15):
    assert param_report(sd15, nnx.Param)["total_params"] == TOTALS["params"] == 859_520_964


@pytest.mark.parametrize("method", sorted(EXPECTED) + ["attention_projections"])
def test_sd15_trainable_counts(sd15, method):
    if method == "attention_projections":  # peft.attention_scope="projections": q/k/v/out of attn1 and attn2
        cfg, want = _cfg("attention", attention_scope="projections"), TOTALS["attention"]
    else:
        cfg, want = _cfg(method, targets=LORA_TARGETS if method == "lora" else None), EXPECTED[method]
    model = nnx.eval_shape(lambda m: apply_peft(m, cfg), nnx.clone(sd15))
    report = param_report(model, trainable_filter(cfg))
    assert report["trainable_params"] == want
    assert report["total_params"] - report["groups"]["added"] == TOTALS["params"]


TINY = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=8)


@nnx.jit
def _run(model, x, t, ctx):
    return model(x, t, ctx)


def _inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.array([10, 700]),
            jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32))


def test_identity_at_init_and_merge():
    """The added modules (DiffFit scales, LoRA, SVDiff shifts, nested in one another) start as the identity;
    after a random update, merging them all gives the same outputs."""
    x, t, ctx = _inputs()
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))
    want = _run(model, x, t, ctx)
    cfg = _cfg("difffit+lora+svdiff", targets=LORA_TARGETS)
    apply_peft(model, cfg, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(_run(model, x, t, ctx)), np.asarray(want), atol=1e-5)
    added = nnx.state(model, trainable_filter(cfg))
    nudge(model, added, 2, 0.05)
    tuned = _run(model, x, t, ctx)
    assert not np.allclose(np.asarray(tuned), np.asarray(want), atol=1e-4)
    merge(model, cfg)
    np.testing.assert_allclose(np.asarray(_run(model, x, t, ctx)), np.asarray(tuned), atol=1e-4)


def test_gradients_reach_only_the_trainable_state():
    x, t, ctx = _inputs()
    cfg = _cfg("norm_bias_attention")
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))
    graph, trainable, frozen = nnx.split(model, trainable_filter(cfg), nnx.Param)

    def loss(tr):
        return jnp.mean(nnx.merge(graph, tr, frozen)(x, t, ctx) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert any(p.endswith("attn2/to_k/kernel") for p in paths) and any(p.endswith("conv_norm_out/scale") for p in paths)
    # the reference's attention blocks include their feed-forward; the ResNet convolutions stay frozen
    assert any(p.endswith("ff/proj/kernel") for p in paths) and not any(p.endswith("conv1/kernel") for p in paths)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_unet_methods_refuse_other_models():
    from peft_jax.models.vit import ViT, ViTConfig

    vit = nnx.eval_shape(lambda: ViT(ViTConfig(image_size=32, depth=1, hidden_size=32, num_heads=2, mlp_dim=64,
                                               num_classes=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="applies to U-Net models, not ViT"):
        apply_peft(vit, _cfg("norm_bias"))
