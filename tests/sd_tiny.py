"""A tiny Stable Diffusion pipeline folder for the text-to-image tests: random weights, built with diffusers and
transformers and saved in the diffusers layout (a one-level U-Net on 16x16 latents, a VAE downsampling by 2, a CLIP
text encoder of width 32, a byte-level tokenizer)."""
import json
import pathlib

import pytest


def build_tiny_pipeline(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    import diffusers
    import torch
    import transformers
    from tokenizers import pre_tokenizers

    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(  # one level: attention in the down, mid and up blocks, little to compile
        sample_size=16, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
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
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    return root


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> pathlib.Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd_tiny"))
