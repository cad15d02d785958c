"""The experiment configuration: every knob is a field, overridable with ``--config.a.b=v``.

``base_config()`` holds every field with its default; experiment files in ``configs/``
start from it and change what they need. The dict is locked, so a misspelt override is
an error that lists the close valid keys instead of a silently ignored setting.
"""
from __future__ import annotations

import difflib

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dry_run = False

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_b16"
    c.model.image_size = 224
    # Optional architecture overrides (None keeps the registered variant's value).
    c.model.patch_size = ml_collections.config_dict.placeholder(int)
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.pool = ml_collections.config_dict.placeholder(str)
    c.model.scan_layers = False
    c.model.remat = False

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"
    c.peft.rank = 8
    c.peft.alpha = 8.0
    c.peft.targets = "qv"  # preset (qv, qkv, attn, all) or a regex on module paths
    c.peft.ssf_init_std = ml_collections.config_dict.placeholder(float)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "breastmnist"
    c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    c.dataset.manual_dir = ml_collections.config_dict.placeholder(str)
    c.dataset.fraction = 1.0
    c.dataset.size = 28  # MedMNIST resolution of the source .npz (28, 64, 128 or 224)
    c.dataset.download = True
    c.dataset.skip_bad_files = False
    c.dataset.augment = True
    c.dataset.num_workers = 0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.lr = 1e-3
    c.train.head_lr = ml_collections.config_dict.placeholder(float)  # None: same as lr
    c.train.weight_decay = 1e-4
    c.train.head_weight_decay = ml_collections.config_dict.placeholder(float)
    c.train.warmup_steps = 50
    c.train.grad_clip = 1.0
    c.train.label_smoothing = 0.0
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.train.patience = 10  # evaluations without a better validation macro-F1 before stopping (0: never)
    c.train.bn_stats = "update"  # ResNet BatchNorm running statistics: "update" or "frozen"
    c.train.progress = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14  # smaller variables are replicated

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ml_collections.config_dict.placeholder(str)  # path or registered name
    return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, name + "."))
    return keys


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(config), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint}"
