"""Text-to-image PEFT of Stable Diffusion 1.5 (launch/train_t2i.py); the sd15_<method>.py files set peft.*."""
import ml_collections
from ml_collections import config_dict


def get_config(method: str = "norm_bias") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))  # a diffusers Stable Diffusion pipeline folder
    c.model = ml_collections.ConfigDict(dict(name="sd15", image_size=512, dtype="float32"))
    c.peft = ml_collections.ConfigDict(dict(method=method, rank=4, alpha=4.0, targets=None, svdiff_targets=None))
    c.dataset = ml_collections.ConfigDict(dict(
        # "image_folder": one subfolder per label (e.g. chest_xray/train/{NORMAL,PNEUMONIA}), prompts from
        # prompt_template. "iu_xray" / "mimic_cxr": the TFDS datasets of launch/prepare_data.py, prompts from
        # their reports' prompt_field: "impression", "findings" or "both".
        name="image_folder", manual_dir="", data_dir=config_dict.placeholder(str), config=config_dict.placeholder(str),
        split="train", skip_bad_files=False, max_images=0,
        prompt_template="a chest x-ray showing {label}", prompt_field="impression"))
    c.train = ml_collections.ConfigDict(dict(num_steps=1000, batch_size=8, lr=1e-4, weight_decay=0.0,
                                             log_every=10, checkpoint_every=200))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, min_shard_size=2**14))  # peft_jax/sharding.py
    # With num_images > 0, the end of training samples that many of the training prompts into samples/.
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=50, guidance_scale=7.5, num_images=0))
    return c
