"""The ViT PEFT catalogue: exact counts on ViT-B/16, identity at initialisation, scan == loop,
merging, the placement of each method checked against a hand-written forward, and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.adapters import apply_peft, merge, param_report, trainable_filter
from peft_jax.adapters.core import path_str
from peft_jax.config import base_config
from peft_jax.train import classify
from peft_jax.models import create_model
from peft_jax.models.vit import LayerShared
from peft_jax.testing import perturb_adapters

HEAD = 768 * 2 + 2  # ViT-B/16 with a 2-class head
D, L, M = 768, 12, 3072
BOTTLENECK_64 = D * 64 + 64 + 64 * D + D  # down kernel + bias, up kernel + bias
BIASES = L * (4 * D + M + D + 2 * D) + D + D  # q, k, v, out, fc1, fc2, norm1, norm2 per block; patch embed; final norm
LN_SCALES = L * 2 * D + D

# Every ViT method, with its closed-form trainable count on ViT-B/16 (written out, not read from the code).
VIT_B16_COUNTS = {
    "vpt_shallow": 10 * D,  # 7,680
    "vpt_deep": L * 10 * D,  # 92,160
    "adapter_houlsby": 2 * L * BOTTLENECK_64 + 2 * LN_SCALES,  # + every LayerNorm, as adapter-bert: 2,417,664
    "adapter_pfeiffer": L * BOTTLENECK_64,  # 1,189,632
    "adaptformer": L * BOTTLENECK_64,  # 1,189,632
    "attention_tune": L * 4 * (D * D + D),  # 28,348,416
    "lora": 294_912,  # r8 on q and v: 12 x 2 x (768x8 + 8x768)
    "dora": 294_912 + L * 2 * D,  # + a magnitude per output column of q and v
    "ia3": L * (D + D + M),  # l_k, l_v, l_ff: 55,296
    "fact_tt": 2 * D * 8 + L * 12 * 8 * 8,  # shared U, V + 12 r x r cores per block: 21,504
    "fact_tk": 2 * D * 8 + 8**3 + 8 * 12 * L,  # shared U, V, r^3 core tensor, P (r x 144): 13,952
    "repadapter": 2 * L * (D * 8 + 8 + 2 * 4 * 384 + D),  # down (768x8 + 8), grouped up (2 groups 4->384) + 768
    "convpass": 2 * L * (D * 8 + 8 + 3 * 3 * 8 * 8 + 8 + 8 * D + D),  # down, 3x3 conv, up: 327,552
    "difffit": BIASES + LN_SCALES + 2 * L * D,  # biases + LayerNorm scales + per-channel branch scales: 140,544
    "ln_tune": 2 * LN_SCALES,
    "bitfit": BIASES,
}
SCANNABLE = ["vpt_shallow", "vpt_deep", "adapter_houlsby", "adapter_pfeiffer", "adaptformer", "attention_tune", "lora",
             "dora", "ia3", "fact_tt", "fact_tk", "repadapter", "convpass", "difffit"]
# adapter_houlsby starts near the backbone only: adapter-bert draws both projections (sigma 1e-3).
IDENTITY_AT_INIT = [m for m in SCANNABLE if not m.startswith("vpt") and m != "adapter_houlsby"]


def peft_cfg(method, **kw):
    c = base_config().peft
    c.method = method
    c.update(kw)
    return c


def tiny(scan=False, pool=None, seed=0):
    model = create_model("vit_ti16", num_classes=3, image_size=32, patch_size=8, depth=2, scan_layers=scan, pool=pool,
                         rngs=nnx.Rngs(seed))
    model.head.kernel[...] = jax.random.normal(jax.random.key(3), model.head.kernel.shape)
    return model


def images(n=2):
    return jax.random.normal(jax.random.key(0), (n, 32, 32, 3))


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


@pytest.mark.parametrize("method", sorted(VIT_B16_COUNTS))
def test_vit_b16_trainable_counts(method):
    cfg = peft_cfg(method)
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("vit_b16", num_classes=2, image_size=224, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    assert param_report(model, trainable_filter(cfg))["trainable_params"] == VIT_B16_COUNTS[method] + HEAD


def test_vit_b16_counts_of_lora_presets_and_options():
    def count(method, **kw):
        cfg = peft_cfg(method, **kw)
        model = nnx.eval_shape(lambda: apply_peft(
            create_model("vit_b16", num_classes=2, image_size=224, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
        return param_report(model, trainable_filter(cfg))["trainable_params"] - HEAD

    lora_layer = D * 8 + 8 * D
    assert count("lora", targets="all") == L * (4 * lora_layer + (D * 8 + 8 * M) + (M * 8 + 8 * D))
    assert count("lora", targets=r"mlp/fc1$", rank=4) == L * (D * 4 + 4 * M)
    assert count("vpt_deep", num_tokens=50) == L * 50 * D
    assert count("adaptformer", bottleneck=8) == L * (D * 8 + 8 + 8 * D + D)
    assert count("vpt_deep+bitfit") == L * 10 * D + BIASES


def test_methods_start_at_the_backbone():
    """Zero-initialised (or unit) adapters: at step 0 every non-prompt method computes the backbone's function."""
    x = images()
    reference = tiny()(x)
    for method in IDENTITY_AT_INIT:
        model = apply_peft(tiny(), peft_cfg(method, dropout=0.0), rngs=nnx.Rngs(1))
        model.eval()
        close(model(x), reference, 1e-5)
    model = apply_peft(tiny(), peft_cfg("adapter_houlsby"), rngs=nnx.Rngs(1))
    close(model(x), reference, 1e-3)


def stacked_copy(loop_model, scan_model):
    """Puts the per-block state of ``loop_model`` into ``scan_model``'s stacked blocks (layer-shared
    variables, found under block 0 of the loop model, stay unstacked)."""
    flat = dict(nnx.to_flat_state(nnx.state(loop_model)))
    state = nnx.state(scan_model)
    for path, var in nnx.to_flat_state(state):
        if path[0] == "blocks" and isinstance(var, LayerShared):
            var.set_value(flat[("blocks", 0) + path[1:]].get_value())
        elif path[0] == "blocks":
            var.set_value(jnp.stack([flat[("blocks", i) + path[1:]].get_value() for i in range(2)]))
        else:
            var.set_value(flat[path].get_value())
    nnx.update(scan_model, state)


def stacked_copy_into_loop(scan_model, loop_model):
    """The inverse of ``stacked_copy`` for the parameters (dropout streams stay as they are)."""
    flat = dict(nnx.to_flat_state(nnx.state(scan_model, nnx.Param)))
    state = nnx.state(loop_model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if path[0] == "blocks" and (path[:1] + path[2:]) in flat:
            source = flat[path[:1] + path[2:]]
            var.set_value(source.get_value() if isinstance(source, LayerShared) else source.get_value()[path[1]])
        else:
            var.set_value(flat[path].get_value())
    nnx.update(loop_model, state)


@pytest.mark.parametrize("method", SCANNABLE)
def test_scanned_model_computes_the_same(method):
    """Adapter variables get the stacked layer axis of a scanned model and are sliced per block."""
    cfg = peft_cfg(method, dropout=0.0)
    loop = apply_peft(tiny(False), cfg, rngs=nnx.Rngs(1))
    perturb_adapters(loop)
    scan = apply_peft(tiny(True), cfg, rngs=nnx.Rngs(1))
    stacked_copy(loop, scan)
    loop.eval()
    scan.eval()
    close(scan(images()), loop(images()), 1e-5)


@pytest.mark.parametrize("method,scan", [
    ("dora", True), ("ia3", True), ("difffit", True), ("repadapter", False), ("repadapter", True), ("fact_tt", False),
    ("fact_tk", False), ("fact_tt", True), ("fact_tk", True), ("repadapter+lora", False), ("ssf+ia3+dora", False), ("fact_tt+difffit+bitfit", False),
])
def test_merge_keeps_outputs_and_removes_adapters(method, scan):
    cfg = peft_cfg(method, dropout=0.0, targets="all")
    model = apply_peft(tiny(scan), cfg, rngs=nnx.Rngs(1))
    perturb_adapters(model)
    model.eval()
    x = images()
    before = model(x)
    merge(model, cfg)
    close(model(x), before, 1e-5)
    plain = tiny(scan)
    assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(nnx.state(model))


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "adapter_houlsby", "adapter_pfeiffer", "adaptformer",
                                    "convpass"])
def test_non_linear_methods_refuse_to_merge(method):
    cfg = peft_cfg(method)
    model = apply_peft(tiny(), cfg, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=f"PEFT method '{method}' adds modules that cannot be merged"):
        merge(model, cfg)


def test_repadapter_merge_order_is_explained():
    cfg = peft_cfg("lora+repadapter", targets="qkv")
    model = apply_peft(tiny(), cfg, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"repadapter at blocks/0/norm1: cannot merge into \['LoRALinear'.*"
                                         r"list repadapter first in peft.method"):
        merge(model, cfg)


@pytest.mark.parametrize("method", ["fact_tt+repadapter", "vpt_shallow+adapter_houlsby", "adaptformer"])
def test_adapter_dropout_in_a_scanned_model(method):
    """Per-layer dropout streams in the scanned blocks: new masks at every call (the counts advance),
    none in eval mode, where the scanned model equals the block-by-block one."""
    cfg = peft_cfg(method, dropout=0.5, prompt_dropout=0.5)
    scan = apply_peft(tiny(True), cfg, rngs=nnx.Rngs(1))
    perturb_adapters(scan, scale=0.5)
    scan.train()
    first, second = scan(images()), scan(images())
    assert float(jnp.abs(first - second).max()) > 1e-3
    counts = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(scan, nnx.RngCount))]
    assert counts and all(int(c.min()) >= 2 for c in counts)
    loop = apply_peft(tiny(False), cfg, rngs=nnx.Rngs(1))
    stacked_copy_into_loop(scan, loop)
    scan.eval()
    loop.eval()
    close(scan(images()), loop(images()), 1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("num_tokens", 0, "peft.num_tokens must be a positive integer"),
    ("activation", "tanh", "peft.activation must be one of"),
    ("prompt_dropout", 1.0, r"dropout must be in \[0, 1\)"),
])
def test_bad_hyper_parameters_are_errors(key, value, match):
    method = "adaptformer" if key == "activation" else "vpt_deep"
    with pytest.raises(ValueError, match=match):
        apply_peft(tiny(), peft_cfg(method, **{key: value}), rngs=nnx.Rngs(1))


def block_forward(block, x):
    x = x + block.attn(block.norm1(x))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_vpt_places_prompts_after_the_prefix(pool):
    """Hand-written VPT forward from the backbone's own modules: [prefix, prompts, patches] at every block
    (deep) or once before the first (shallow, the prompts' outputs dropped before the final norm)."""
    x = images()
    for method in ("vpt_deep", "vpt_shallow"):
        model = apply_peft(tiny(pool=pool), peft_cfg(method, num_tokens=3), rngs=nnx.Rngs(1))
        model.eval()
        prefix = 1 if pool == "token" else 0
        h = model.embed(x)
        if method == "vpt_shallow":
            p = jnp.broadcast_to(model.extra_tokens.prompts[...], (2, 3, 192))
            h = jnp.concatenate([h[:, :prefix], p, h[:, prefix:]], axis=1)
        for wrapper in model.blocks:
            if method == "vpt_deep":
                p = jnp.broadcast_to(wrapper.prompts[...], (2, 3, 192))
                h = jnp.concatenate([h[:, :prefix], p, h[:, prefix:]], axis=1)
                h = block_forward(wrapper.base, h)
                h = jnp.concatenate([h[:, :prefix], h[:, prefix + 3:]], axis=1)
            else:
                h = block_forward(wrapper, h)
        if method == "vpt_shallow":
            h = jnp.concatenate([h[:, :prefix], h[:, prefix + 3:]], axis=1)
        h = model.norm(h)
        pooled = h[:, 0] if pool == "token" else h.mean(axis=1)
        close(model(x), model.head(pooled), 1e-5)


def test_adapter_placements_match_a_hand_written_block():
    """Houlsby after attention and MLP, Pfeiffer after the MLP, AdaptFormer parallel to the MLP on the
    un-normalised input (scale 0.1), RepAdapter after the norms, Convpass beside both sub-layers."""
    x = jax.random.normal(jax.random.key(1), (2, 17, 192))
    for method in ("adapter_houlsby", "adapter_pfeiffer", "adaptformer", "repadapter", "convpass", "ia3", "difffit"):
        model = apply_peft(tiny(), peft_cfg(method, dropout=0.0), rngs=nnx.Rngs(1))
        perturb_adapters(model, scale=0.2)
        model.eval()
        blk = model.blocks[0]
        if method == "adaptformer":
            b = blk.base
            h = x + b.attn(b.norm1(x))
            ref = h + b.mlp(b.norm2(h)) + 0.1 * blk.adapter(h)
        elif method == "adapter_houlsby":
            out, fc2 = blk.attn.out, blk.mlp.fc2
            assert type(out).__name__ == "SequentialAdapter" and type(fc2).__name__ == "SequentialAdapter"
            y = out.base(x)
            close(out(x), y + out.adapter(y))
            ref = block_forward(blk, x)
        elif method == "adapter_pfeiffer":
            assert type(blk.attn.out).__name__ == "Dense" and type(blk.mlp.fc2).__name__ == "SequentialAdapter"
            ref = block_forward(blk, x)
        elif method == "repadapter":
            n1 = blk.norm1.base(x)
            w = blk.norm1
            adapted = n1 + (n1 @ w.down_kernel[...] + w.down_bias[...]) @ w.dense_up() + w.up_bias[...]
            h = x + blk.attn(adapted)
            n2 = blk.norm2(h)
            ref = h + blk.mlp(n2)
            close(blk.norm1(x), adapted)
        elif method == "convpass":
            n1 = blk.norm1(x)
            h = x + blk.attn.base(n1) + blk.attn.convpass(n1)
            ref = h + blk.mlp.base(blk.norm2(h)) + blk.mlp.convpass(blk.norm2(h))
        elif method == "ia3":
            a = blk.attn
            assert [type(m).__name__ for m in (a.query, a.key, a.value, a.out)] == ["Dense", "ChannelScale",
                                                                                     "ChannelScale", "Dense"]
            assert blk.mlp.fc2.side == "in" and a.key.side == "out"
            ref = block_forward(blk, x)
        else:  # difffit: scales on the attention and MLP branch outputs
            assert blk.attn.out.side == "out" and blk.mlp.fc2.side == "out"
            ref = block_forward(blk, x)
        close(blk(x), ref, 1e-5)


def test_convpass_runs_the_patch_grid_through_a_3x3_conv():
    model = apply_peft(tiny(), peft_cfg("convpass", dropout=0.0), rngs=nnx.Rngs(1))
    perturb_adapters(model, scale=0.2)
    branch = model.blocks[0].attn
    x = jax.random.normal(jax.random.key(1), (1, 17, 192))
    base = branch.convpass(x)
    # Changing one patch token changes only its 3x3 neighbourhood on the 4x4 grid (and not the class token).
    moved = branch.convpass(x.at[:, 1 + 5].add(1.0))  # patch (1, 1)
    changed = np.flatnonzero(np.abs(np.asarray(moved - base)).max(-1)[0] > 1e-6)
    assert set(changed - 1) == {r * 4 + c for r in range(3) for c in range(3)}


def test_tuned_weights_are_the_right_ones():
    def trained(method):
        cfg = peft_cfg(method)
        model = apply_peft(tiny(), cfg, rngs=nnx.Rngs(1))
        return {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))}

    attention = trained("attention_tune") - {"head/kernel", "head/bias"}
    assert attention == {f"blocks/{i}/attn/{m}/{w}" for i in range(2) for m in ("query", "key", "value", "out")
                         for w in ("kernel", "bias")}
    difffit = trained("difffit")
    assert "blocks/0/norm1/scale" in difffit and "blocks/0/mlp/fc1/bias" in difffit
    assert "blocks/0/attn/out/scale" in difffit and "blocks/0/mlp/fc2/base/bias" in difffit
    assert not any(p.endswith("kernel") and not p.startswith("head") for p in difffit)


# ``--config.dry_run`` (abstract build, sharding, one compiled train step) for the ViT methods on ViT-B/16
# (every method, one device) and ViT-H/14 (every method, grouped into four compiles of the scanned model,
# FSDP over 8 simulated devices), and the block-by-block ViT-B/16; the methods' default adapter dropout included.

def assert_arguments_are_the_shards(result):
    """Per device, the compiled step's arguments are its frozen, trainable and optimizer shards plus the batch
    (8 images of 224 px: 4.8 MB) and the BatchNorm-free rest: nothing is replicated by mistake."""
    shards = sum(result[k] for k in ("frozen_bytes_per_device", "trainable_bytes_per_device",
                                     "optimizer_bytes_per_device"))
    assert shards <= result["memory_analysis"]["argument_size_in_bytes"] < shards + 2**23


def dry(tmp_path, name, method, scan=True, fsdp=1):
    c = base_config()
    c.model.name, c.model.scan_layers, c.model.remat = name, scan, scan
    c.peft.method = method
    c.train.batch_size = 8
    c.mesh.fsdp = fsdp
    return classify.dry_run(c, tmp_path)


@pytest.mark.parametrize("method", SCANNABLE)
def test_vit_b16_dry_run(tmp_path, method):
    result = dry(tmp_path, "vit_b16", method)
    assert result["trainable_params"] == VIT_B16_COUNTS[method] + HEAD
    assert_arguments_are_the_shards(result)


def test_vit_b16_dry_run_unscanned(tmp_path):
    """The block-by-block model (the default for ViT-B) compiles too."""
    result = dry(tmp_path, "vit_b16", "vpt_shallow+fact_tt", scan=False)
    assert result["trainable_params"] == VIT_B16_COUNTS["vpt_shallow"] + VIT_B16_COUNTS["fact_tt"] + HEAD


@pytest.mark.parametrize("method,expected", [
    # ViT-H/14: width 1280, 32 blocks, MLP 5120; 2-class head 2,562
    # VPT-deep 10 tokens, (IA)^3 vectors, DoRA r8 on q, v with magnitudes, head
    ("vpt_deep+ia3+dora", 32 * 10 * 1280 + 32 * (1280 + 1280 + 5120) + 32 * 2 * (2 * 1280 * 8 + 1280) + 2_562),
    ("adaptformer+repadapter+difffit+lora", None),
    ("convpass+attention_tune+adapter_houlsby+adapter_pfeiffer", None),
    # VPT-shallow 10 tokens; FacT-TT r8: shared U, V and 12 cores of 8x8 per block (q, k, v, out: one
    # 1280x1280 block each; fc1, fc2: four each)
    ("vpt_shallow+fact_tt", 10 * 1280 + 2 * 1280 * 8 + 32 * 12 * 8 * 8 + 2_562),
    ("fact_tk+bitfit", None),
])
def test_vit_h14_dry_run(tmp_path, method, expected):
    result = dry(tmp_path, "vit_h14", method, fsdp=8)  # frozen weights FSDP-sharded over 8 devices
    assert result["num_devices"] == 8 and result["frozen_bytes_per_device"] < result["frozen_bytes_total"] / 4
    if expected is not None:
        assert result["trainable_params"] == expected
    assert_arguments_are_the_shards(result)
