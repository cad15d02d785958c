"""Stable Diffusion in Flax NNX: U-Net, autoencoder, CLIP text encoder and noise schedulers."""
from peft_jax.models.diffusion.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from peft_jax.models.diffusion.unet import UNET_VARIANTS, UNet2DConditionModel, UNetConfig
from peft_jax.models.diffusion.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "UNET_VARIANTS", "UNet2DConditionModel",
    "UNetConfig", "VAEConfig",
]
