"""Parity of the NNX Stable Diffusion models with diffusers / transformers, through save_pretrained folders.

Tiny random configurations are built in torch, saved as safetensors, loaded with
``peft_jax.models.from_pretrained`` and run on the same inputs: outputs agree to 1e-4.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from peft_jax.checkpoints.core import CheckpointError  # noqa: E402
from peft_jax.checkpoints.diffusers import load_pipeline, load_tokenizer  # noqa: E402
from peft_jax.models import from_pretrained  # noqa: E402

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
# SD 2.x style: linear projections, per-block head counts, two transformer layers, all-attention blocks.
TINY_UNET_SD2 = dict(TINY_UNET, down_block_types=("CrossAttnDownBlock2D",) * 2,
                     up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 4),
                     use_linear_projection=True, transformer_layers_per_block=2, cross_attention_dim=24)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                norm_num_groups=8, layers_per_block=1)
TINY_CLIP = dict(vocab_size=300, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=298, eos_token_id=299, pad_token_id=299)


@nnx.jit(static_argnames="method")
def _run(model, *args, method="__call__"):
    """One compiled call (op-by-op eager execution of a U-Net is several times slower on CPU)."""
    return getattr(model, method)(*args)


def _randomise(module):
    """Random weights everywhere (diffusers zero-initialises some output layers, which would hide errors)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A whole tiny pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    _randomise(diffusers.UNet2DConditionModel(**TINY_UNET)).save_pretrained(root / "unet")
    _randomise(diffusers.AutoencoderKL(**TINY_VAE)).save_pretrained(root / "vae")
    _randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP))).save_pretrained(
        root / "text_encoder")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    _write_tokenizer(root / "tokenizer")
    return root


def _write_tokenizer(folder):
    """A small CLIP BPE vocabulary: the 256 byte symbols, their word-final forms, a few merges, specials."""
    folder.mkdir(parents=True)
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["c h", "ch e", "s t</w>", "x -", "r a", "a y</w>"]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def _unet_parity(folder, config, seed):
    rng = np.random.default_rng(seed)
    ours = from_pretrained("unet2d_condition", folder)
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([3, 917])
    ctx = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        want = _nhwc(ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    got = np.asarray(_run(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unet_sd1_parity(pipeline_dir):
    _unet_parity(pipeline_dir / "unet", TINY_UNET, 0)


def test_unet_sd2_parity(tmp_path):
    _randomise(diffusers.UNet2DConditionModel(**TINY_UNET_SD2)).save_pretrained(tmp_path)
    _unet_parity(tmp_path, TINY_UNET_SD2, 1)


def test_vae_parity(pipeline_dir):
    ours = from_pretrained("autoencoder_kl", pipeline_dir)  # a pipeline folder finds vae/
    ref = diffusers.AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(x)).latent_dist
        want_mean, want_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
        want_img = _nhwc(ref.decode(dist.mean).sample)
    mean, logvar = _run(ours, jnp.asarray(x), method="encode")
    np.testing.assert_allclose(np.asarray(mean), want_mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), want_logvar, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(_run(ours, mean, method="decode")), want_img, atol=1e-4, rtol=1e-4)
    assert ours.config.scaling_factor == pytest.approx(0.18215)
    np.testing.assert_allclose(np.asarray(_run(ours, jnp.asarray(x), method="latents")), 0.18215 * want_mean, atol=1e-4)


def test_clip_text_parity(pipeline_dir):
    ours = from_pretrained("clip_text", pipeline_dir)
    ref = transformers.CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    ids = np.random.default_rng(3).integers(0, 298, (2, 77))
    ids[:, 0], ids[0, 5:], ids[1, 40:] = 298, 299, 299
    with torch.no_grad():
        out = ref(torch.from_numpy(ids))
    hidden = _run(ours, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.pooled(jnp.asarray(ids), hidden)), out.pooler_output.numpy(),
                               atol=1e-4, rtol=1e-4)


def test_tokenizer_matches_transformers(pipeline_dir):
    ours = load_tokenizer(pipeline_dir)
    ref = transformers.CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    prompts = ["A chest  X-ray showing PNEUMONIA.", "cheST x-ray, normal", "words " * 60]
    want = ref(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    got = ours(prompts)
    assert got.shape == (3, 77)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_pipeline_folder_and_errors(pipeline_dir, tmp_path):
    pipe = load_pipeline(pipeline_dir)
    assert pipe.scheduler.steps_offset == 1 and pipe.unet.config.block_out_channels == (32, 64)
    # Pickled torch weights are never read.
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((pipeline_dir / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled"):
        from_pretrained("unet2d_condition", tmp_path)
    # A config that does not fit the weights is one error listing every problem.
    cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 32]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shape mismatches"):
        from_pretrained("unet2d_condition", tmp_path)
    cfg["class_embed_type"] = "timestep"
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        from_pretrained("unet2d_condition", tmp_path)
