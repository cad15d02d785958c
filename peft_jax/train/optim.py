"""AdamW with warm-up + cosine decay, in parameter groups (``optax.partition``).

Groups: the new head and the PEFT body (adapters or tuned weights) each get their own
learning rate and weight decay; biases, norms, scales and other 1-D parameters are
never decayed. The optimizer only ever sees the trainable state, so its memory is
exactly 8 bytes per trainable parameter.
"""
from __future__ import annotations

import re

import jax
import ml_collections
import optax

from peft_jax.adapters.core import HEAD_PATTERN, path_str


def schedule(lr: float, cfg: ml_collections.ConfigDict) -> optax.Schedule:
    warmup = min(int(cfg.warmup_steps), max(int(cfg.num_steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(int(cfg.num_steps), warmup + 1),
        end_value=0.0)


def _keys(path) -> str:
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return path_str(keys)


def group_labels(trainable) -> object:
    """'head' or 'body' for every trainable leaf."""
    head = re.compile(HEAD_PATTERN)
    return jax.tree_util.tree_map_with_path(lambda p, _: "head" if head.search(_keys(p)) else "body", trainable)


def decay_mask(tree) -> object:
    """Weight decay on matrices and kernels only (ndim >= 2), never on biases, norms or scales."""
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``cfg`` is the ``train`` config."""
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    head_wd = cfg.head_weight_decay if cfg.head_weight_decay is not None else cfg.weight_decay

    def adamw(lr, wd):
        return optax.adamw(schedule(lr, cfg), b1=0.9, b2=0.999, weight_decay=wd, mask=decay_mask)

    groups = optax.partition({"head": adamw(head_lr, head_wd), "body": adamw(cfg.lr, cfg.weight_decay)},
                             group_labels)
    if cfg.grad_clip and cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), groups)
    return groups
