"""Text-to-image PEFT of Stable Diffusion 1.5 (launch/train_t2i.py); the sd15_<method>.py files set peft.*."""
import ml_collections


def get_config(method: str = "norm_bias") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))  # a diffusers Stable Diffusion pipeline folder
    c.model = ml_collections.ConfigDict(dict(name="sd15", image_size=512, dtype="float32"))
    c.peft = ml_collections.ConfigDict(dict(method=method, rank=4, alpha=4.0, targets=None, svdiff_targets=None))
    # An image folder with one subfolder per label (e.g. chest_xray/train/{NORMAL,PNEUMONIA}).
    c.dataset = ml_collections.ConfigDict(dict(name="image_folder", manual_dir="", max_images=0,
                                               prompt_template="a chest x-ray showing {label}"))
    c.train = ml_collections.ConfigDict(dict(num_steps=1000, batch_size=8, lr=1e-4, weight_decay=0.0,
                                             log_every=10))
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=50, guidance_scale=7.5, num_images=0))
    return c
