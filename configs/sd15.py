"""Text-to-image PEFT of Stable Diffusion 1.5 (launch/train_t2i.py), one config per U-Net method.

    python launch/train_t2i.py --config configs/sd15.py:lora --config.init.checkpoint=/models/sd15 ...

The argument after ``:`` is ``peft.method``: attention, bias, norm, norm_bias (the default),
norm_bias_attention, lora, svdiff, difffit or full (see docs/text_to_image.md).
"""
import ml_collections
from ml_collections import config_dict

METHODS = ("attention", "bias", "norm", "norm_bias", "norm_bias_attention", "lora", "svdiff", "difffit", "full")


def get_config(method: str = "norm_bias") -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"configs/sd15.py:{method}: unknown method; use one of {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init = ml_collections.ConfigDict(dict(checkpoint=""))  # a diffusers Stable Diffusion pipeline folder
    c.model = ml_collections.ConfigDict(dict(name="sd15", image_size=512, dtype="float32"))
    c.peft = ml_collections.ConfigDict(dict(method=method, rank=4, alpha=4.0, targets=None, svdiff_targets=None))
    if method == "lora":
        c.peft.targets = r"attn[12]/(to_q|to_k|to_v|to_out)$"  # self- and cross-attention projections
    c.dataset = ml_collections.ConfigDict(dict(
        # "image_folder": one subfolder per label (e.g. chest_xray/train/{NORMAL,PNEUMONIA}), prompts from
        # prompt_template. "iu_xray" / "mimic_cxr": the TFDS datasets of launch/prepare_data.py, prompts from
        # their reports' prompt_field: "impression", "findings" or "both".
        name="image_folder", manual_dir="", data_dir=config_dict.placeholder(str), config=config_dict.placeholder(str),
        split="train", skip_bad_files=False, max_images=0,
        prompt_template="a chest x-ray showing {label}", prompt_field="impression"))
    # AdamW at a constant rate (peft_jax/train/optim.py; lr_mults / wd_mults add parameter groups).
    c.train = ml_collections.ConfigDict(dict(num_steps=1000, batch_size=8, lr=1e-5 if method == "full" else 1e-4,
                                             weight_decay=0.0, schedule="constant", lr_mults=(), wd_mults=(),
                                             log_every=10, checkpoint_every=200))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, min_shard_size=2**14, rules=()))  # peft_jax/sharding.py
    return c
