"""AdamW with warm-up + cosine decay (or a constant rate), in parameter groups (``optax.partition``).

Groups come from the config, big_vision style: ``train.lr_mults`` and ``train.wd_mults`` are
``(regex, multiplier)`` pairs matched with ``re.search`` against each trainable variable's path
(``head/kernel``, ``blocks/3/attn/query/lora_a``); the first match wins and an unmatched variable
gets 1.0. For example ``train.lr_mults=(("^head/", 10.0),)`` trains the new head ten times faster.
Weight decay applies to matrices and kernels only: biases, norms, scales and other 1-D parameters
are never decayed. The optimizer only ever sees the trainable state, so its memory is exactly
8 bytes per trainable parameter.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_collections
import optax

from peft_jax.errors import UserError
from peft_jax.paths import keypath_str

SCHEDULES = ("warmup_cosine", "constant")


def schedule(lr: float, cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """``train.schedule``: linear warm-up then cosine decay to 0 over ``num_steps``, or a constant rate."""
    kind = cfg.get("schedule", "warmup_cosine")
    if kind not in SCHEDULES:
        raise UserError(f"train.schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return optax.constant_schedule(lr)
    warmup = min(int(cfg.warmup_steps), max(int(cfg.num_steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(int(cfg.num_steps), warmup + 1),
        end_value=0.0)


def _multiplier(path: str, mults: Sequence[tuple[str, float]]) -> float:
    for pattern, mult in mults:
        if re.search(pattern, path):
            return float(mult)
    return 1.0


def check_mults(cfg: ml_collections.ConfigDict) -> None:
    for field in ("lr_mults", "wd_mults"):
        for entry in cfg.get(field, ()):
            ok = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            if not ok or not isinstance(entry[1], (int, float)) or entry[1] < 0:
                raise UserError(f"train.{field}: each entry must be (regex, multiplier >= 0), got {entry!r}")
            try:
                re.compile(entry[0])
            except re.error as e:
                raise UserError(f"train.{field}: bad regex {entry[0]!r} ({e})") from None


def group_labels(trainable, cfg: ml_collections.ConfigDict):
    """The group of every trainable leaf: ``lr<m>_wd<m>`` from its learning-rate and weight-decay multipliers."""
    lr_mults, wd_mults = cfg.get("lr_mults", ()), cfg.get("wd_mults", ())

    def label(path, _):
        name = keypath_str(path)
        return f"lr{_multiplier(name, lr_mults):g}_wd{_multiplier(name, wd_mults):g}"

    return jax.tree_util.tree_map_with_path(label, trainable)


def decay_mask(tree):
    """Weight decay on matrices and kernels only (ndim >= 2), never on biases, norms or scales."""
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``cfg`` is the ``train`` config: lr, weight_decay, schedule, warmup_steps, num_steps, grad_clip,
    lr_mults, wd_mults."""
    check_mults(cfg)

    lr_values = {1.0} | {float(m) for _, m in cfg.get("lr_mults", ())}
    wd_values = {1.0} | {float(m) for _, m in cfg.get("wd_mults", ())}
    groups = {f"lr{lm:g}_wd{wm:g}": optax.adamw(schedule(cfg.lr * lm, cfg), b1=0.9, b2=0.999,
                                                 weight_decay=cfg.weight_decay * wm, mask=decay_mask)
              for lm in sorted(lr_values) for wm in sorted(wd_values)}
    partitioned = optax.partition(groups, lambda tree: group_labels(tree, cfg))
    if cfg.get("grad_clip") and cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), partitioned)
    return partitioned
