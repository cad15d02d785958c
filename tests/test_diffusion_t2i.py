"""CPU smoke run of text-to-image PEFT on the real chest X-rays: a tiny SD pipeline (random weights, built in
diffusers and saved), label prompts, a few dozen steps; the loss falls, sampling gives latents and images of the
right shape, and the FID between generated and real images is finite."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "launch"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))

import train_t2i  # noqa: E402
from sd15_common import get_config  # noqa: E402

from peft_jax.checkpoints.diffusers import load_pipeline  # noqa: E402
from peft_jax.metrics import fid  # noqa: E402
from peft_jax.models.diffusion import schedulers  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_tiny")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                            layers_per_block=1).save_pretrained(root / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77)).save_pretrained(root / "text_encoder")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            steps_offset=1).save_pretrained(root / "scheduler")
    tok = root / "tokenizer"
    tok.mkdir()
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    return root


def test_train_sample_fid_on_chest_xrays(shared_data, tiny_pipeline, tmp_path):
    cfg = get_config("norm_bias_attention")
    cfg.init.checkpoint = str(tiny_pipeline)
    cfg.model.image_size = 32
    cfg.dataset.manual_dir = str(shared_data / "chest_xray" / "train")
    cfg.dataset.max_images = 32
    cfg.train.update(num_steps=40, batch_size=8, lr=3e-3, log_every=0)
    results = train_t2i.train(cfg, tmp_path)
    losses = np.asarray(results["losses"])
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert 0 < results["trainable_params"] < results["total_params"]

    pipe = load_pipeline(tiny_pipeline)
    context = jnp.asarray(train_t2i.encode_prompts(pipe, ["a chest x-ray showing pneumonia"] * 4))
    uncond = jnp.asarray(train_t2i.encode_prompts(pipe, [""] * 4))
    sampler = schedulers.make_sampler("ddim", pipe.scheduler, 5)
    latents = nnx.jit(lambda unet, c, u, k: schedulers.sample(unet, sampler, c, u, shape=(4, 16, 16, 4), key=k,
                                                              guidance_scale=3.0))(pipe.unet, context, uncond,
                                                                                   jax.random.key(0))
    images = np.clip(np.asarray(nnx.jit(lambda v, z: v.decode_latents(z))(pipe.vae, latents)), -1, 1)
    assert latents.shape == (4, 16, 16, 4) and images.shape == (4, 32, 32, 3)
    real, _ = train_t2i.image_folder(cfg.dataset.manual_dir, 32, max_images=8)

    def features(x):  # 4x4 average-pooled pixels: a cheap stand-in for Inception features
        return x.reshape(len(x), 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(len(x), -1)

    assert np.isfinite(fid([real], [images], features))
