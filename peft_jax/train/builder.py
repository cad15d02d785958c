"""From a config to a model with its PEFT surgery applied and the trainable filter."""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
from flax import nnx

from peft_jax.adapters import apply_peft, trainable_filter
from peft_jax.adapters.core import Filter
from peft_jax.adapters.import_hf import start_from_hf_adapter
from peft_jax.adapters.io import ADAPTER_FILE, put_arrays, read_adapter_config, state_hash
from peft_jax.errors import UserError
from peft_jax.files import read_safetensors
from peft_jax.models import EFFICIENTNET_NAMES, RESNET_NAMES, create_model, from_pretrained


@dataclasses.dataclass
class Built:
    model: nnx.Module
    trainable: Filter
    base_hash: str | None  # sha256 of the backbone before surgery (None for abstract models)


# model.remat and model.remat_policy both unset: the policy measured best for the method on a ViT (BENCHMARKS.md,
# the vit_memory sections, ViT-B/16 fp32, scheduler off). LoRA (two runs): peak 2.36 -> 1.64 GB (torch+peft 2.11)
# at 0.98-1.04x the step time; VPT-deep: 2.40 -> 1.67 GB (torch 1.80) at 1.03x. Not SSF: 2.64 -> 2.62 GB at 1.36x
# (its scales need the activations anyway). Methods not measured that way keep every activation.
AUTO_REMAT_POLICIES = {"lora": "projections_saveable", "vpt_deep": "projections_saveable"}


def remat_setting(cfg: ml_collections.ConfigDict) -> tuple[bool, str | None]:
    """(model.remat, model.remat_policy) for a ViT: the config's, or with both unset the method's measured default."""
    remat, policy = cfg.model.get("remat"), cfg.model.get("remat_policy")
    if remat is None and policy is None and cfg.peft.method in AUTO_REMAT_POLICIES:
        return True, AUTO_REMAT_POLICIES[cfg.peft.method]
    return bool(remat), policy


def model_overrides(cfg: ml_collections.ConfigDict) -> dict:
    dtype, matmul_dtype = cfg.train.compute_dtype, cfg.train.get("matmul_dtype")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"train.compute_dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if matmul_dtype not in (None, dtype, "bfloat16"):
        raise UserError(f"train.matmul_dtype must be unset, 'bfloat16' or train.compute_dtype ({dtype!r}), got "
                         f"{matmul_dtype!r}")
    if cfg.model.name in RESNET_NAMES + EFFICIENTNET_NAMES:
        if dtype != "float32" or matmul_dtype not in (None, "float32"):
            raise UserError("train.compute_dtype / train.matmul_dtype 'bfloat16' are implemented for ViTs only; "
                             "use float32 for ResNets and EfficientNets")
        return {} if cfg.model.name in RESNET_NAMES else {"drop_connect_rate": cfg.model.get("drop_connect_rate")}
    remat, remat_policy = remat_setting(cfg)
    return dict(patch_size=cfg.model.patch_size, depth=cfg.model.depth, pool=cfg.model.pool,
                scan_layers=cfg.model.scan_layers, remat=remat, remat_policy=remat_policy,
                dtype=dtype, matmul_dtype=matmul_dtype)


def load_native(model: nnx.Module, directory: pathlib.Path, num_classes: int) -> None:
    """Initialises a model from a peft_jax ``full`` run's adapter folder (e.g. the quickstart's pre-training).

    The head is kept if its class count matches and re-initialised otherwise.
    """
    meta = read_adapter_config(directory)
    if meta["peft"]["method"] != "full":
        raise UserError(f"{directory} holds a {meta['peft']['method']!r} adapter; only a 'full' run's folder is a "
                         "complete set of weights to start from")
    arrays = read_safetensors(directory / ADAPTER_FILE, "copy the run's adapter folder again")
    assigned = put_arrays(model, arrays, (("params/", nnx.Param), ("state/", nnx.BatchStat)),
                          f"{directory} (a {meta.get('model', {}).get('name')} run)", may_differ=lambda key: key.startswith("head/"))
    if "params/head/kernel" not in assigned:
        print(f"[init] {directory}: head re-initialised for {num_classes} classes")


def backbone(cfg: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    """The model before surgery: random (seeded) or from ``init.checkpoint``."""
    name, size = cfg.model.name, cfg.model.image_size
    rngs = nnx.Rngs(params=cfg.seed)
    ckpt = cfg.init.checkpoint
    if ckpt and (pathlib.Path(ckpt) / ADAPTER_FILE).is_file():
        model = create_model(name, num_classes=num_classes, image_size=size, rngs=rngs, **model_overrides(cfg))
        load_native(model, pathlib.Path(ckpt), num_classes)
        return model
    if ckpt:
        return from_pretrained(name, ckpt, num_classes=num_classes, image_size=size, rngs=rngs,
                               **model_overrides(cfg))
    return create_model(name, num_classes=num_classes, image_size=size, rngs=rngs, **model_overrides(cfg))


def build(cfg: ml_collections.ConfigDict, num_classes: int) -> Built:
    model = backbone(cfg, num_classes)
    base_hash = state_hash(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head")))))
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(params=cfg.seed + 1))
    start_from_hf_adapter(model, cfg)  # init.adapter: a PyTorch peft adapter to continue from
    return Built(model, trainable_filter(cfg.peft), base_hash)


def build_abstract(cfg: ml_collections.ConfigDict, num_classes: int) -> Built:
    """Shapes only: nothing is allocated (for dry runs of ViT-H on a laptop)."""
    def make():
        rngs = nnx.Rngs(params=cfg.seed)
        model = create_model(cfg.model.name, num_classes=num_classes, image_size=cfg.model.image_size,
                             rngs=rngs, **model_overrides(cfg))
        return apply_peft(model, cfg.peft, rngs=nnx.Rngs(params=cfg.seed + 1))

    return Built(nnx.eval_shape(make), trainable_filter(cfg.peft), None)


def parameter_bytes(state) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
