"""Strict key mapping from a checkpoint's arrays onto an NNX model's variables.

Every checkpoint array must be used or explicitly dropped, every model variable must
get a value (or be declared freshly initialised), and every shape must match: a
silently half-loaded backbone would make a PEFT experiment meaningless, so all
problems are collected and reported together in one error.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval

from peft_jax.errors import UserError
from peft_jax.paths import path_str

log = logging.getLogger("peft_jax.checkpoints")

Path = tuple  # a variable's path in the model, e.g. ("layer1", 0, "conv1", "kernel")
Converted = dict  # Path -> (source key, np.ndarray)

_SHOWN = 25  # names listed per kind of problem before "... and N more"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the requested architecture."""


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_SHOWN]
    more = f"\n    ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


class KeyMapper:
    """Collects (model path <- checkpoint key) assignments and remembers which keys were used."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.converted: Converted = {}

    def has(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str) -> np.ndarray | None:
        """The array of `key`, marked as used; None (and recorded as missing) if absent."""
        if key not in self.arrays:
            self.missing.append(key)
            return None
        self.used.add(key)
        return np.asarray(self.arrays[key])

    def map(self, target: Path, key: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> None:
        """Assigns fn(checkpoint[key]) to the model variable at `target`."""
        array = self.take(key)
        if array is not None:
            self.converted[target] = (key, np.asarray(fn(array)))

    def drop(self, key: str) -> None:
        """Consumes a key on purpose without loading it (e.g. BatchNorm's num_batches_tracked)."""
        if key in self.arrays:
            self.used.add(key)

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def torch_linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> nnx.Linear kernel (in, out)."""
    return w.T


def torch_conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight OIHW -> nnx.Conv kernel HWIO."""
    return w.transpose(2, 3, 1, 0)


@contextlib.contextmanager
def fast_model_tracing():
    """Skips the jaxpr walk behind tracer error messages while a model constructor is traced.

    Each RNG draw makes Flax's ``Variable.set_value`` read ``.sharding`` of the traced count; on a
    tracer that raises an AttributeError (Flax catches it) whose message first walks the whole jaxpr
    for the value's origin (jax 0.10 ``_origin_msg``), so tracing a model is quadratic in its size:
    EfficientNet-Lite0's ``nnx.eval_shape`` took 9.5 s here, 4.2 s without the walk. The message is
    never shown, so nothing is lost; outside this block JAX is untouched.
    """
    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    original = getattr(tracer, "_origin_msg", None)
    if original is None:  # another JAX version: nothing to skip
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


# One abstract model per constructor: checking a checkpoint and building the model trace it once, not twice.
_ABSTRACT: "weakref.WeakKeyDictionary[Callable, nnx.Module]" = weakref.WeakKeyDictionary()


def abstract_model(ctor: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """The model `ctor` builds, as shapes and dtypes only (``nnx.eval_shape``; nothing allocated)."""
    if ctor not in _ABSTRACT:
        with fast_model_tracing():
            _ABSTRACT[ctor] = nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))
    return _ABSTRACT[ctor]


def expected_shapes(ctor: Callable[[nnx.Rngs], nnx.Module]) -> dict[Path, tuple[int, ...]]:
    """Shapes of all variables of the model `ctor` builds, without allocating it."""
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract_model(ctor)))}


def check_fit(
    where: str,
    mapper: KeyMapper,
    converted: Converted,
    expected: Mapping[Path, tuple[int, ...]],
    fresh: Iterable[Path] = (),
) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key."""
    fresh = set(fresh)
    problems = []
    if mapper.missing:
        problems.append(_listing("missing keys", sorted(set(mapper.missing))))
    if mapper.unused():
        problems.append(_listing("unexpected keys", mapper.unused()))
    not_in_model = sorted(f"{src} -> {path_str(p)}" for p, (src, _) in converted.items() if p not in expected)
    if not_in_model:
        problems.append(_listing("keys with no place in the model", not_in_model))
    mismatched = sorted(
        f"{src} -> {path_str(p)}: checkpoint {tuple(a.shape)}, model {expected[p]}"
        for p, (src, a) in converted.items()
        if p in expected and tuple(a.shape) != expected[p]
    )
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    uncovered = sorted(path_str(p) for p in expected if p not in converted and p not in fresh)
    if uncovered:
        problems.append(_listing("model variables the checkpoint does not provide", uncovered))
    if problems:
        raise CheckpointError(f"{where}:\n" + "\n".join(problems))


def build(
    ctor: Callable[[nnx.Rngs], nnx.Module],
    values: Mapping[Path, np.ndarray],
    *,
    fresh: Iterable[Path] = (),
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Builds the model of `ctor` with `values`, initialising only the `fresh` paths.

    The model is created abstractly and filled in, so a ViT-H is never randomly
    initialised just to be overwritten; fresh variables come from one jitted
    initialisation in which XLA drops every unused random draw.
    """
    fresh = set(fresh)
    graphdef, state = nnx.split(abstract_model(ctor))
    flat = list(nnx.to_flat_state(state))
    new_values = {}
    if fresh:
        key = rngs.params()

        def init():
            _, st = nnx.split(ctor(nnx.Rngs(key)))
            return {p: v.get_value() for p, v in nnx.to_flat_state(st) if p in fresh}

        with fast_model_tracing():
            new_values = jax.jit(init)()
    leaves = []
    for p, var in flat:
        value = values[p] if p in values else new_values[p]
        leaves.append((p, var.replace(jnp.asarray(value, dtype=var.dtype))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.eval()
    return model


def decide_head(
    where: str, checkpoint_classes: int | None, num_classes: int | None, *, head_usable: bool = True
) -> tuple[int, bool]:
    """(number of classes, whether the head is re-initialised) for a checkpoint's head.

    The head is kept when the checkpoint has one, it is usable on its own, and the class
    count matches; otherwise it is re-initialised, which needs an explicit num_classes.
    """
    if num_classes is None:
        if checkpoint_classes is None:
            raise CheckpointError(f"{where} has no classification head: pass num_classes for a new one")
        if not head_usable:
            raise CheckpointError(
                f"{where}: its head sits on a pre-logits layer this model does not have; "
                "pass num_classes to fine-tune with a new head"
            )
        return checkpoint_classes, False
    if checkpoint_classes == num_classes and head_usable:
        return num_classes, False
    if checkpoint_classes is None:
        reason = "the checkpoint has no head"
    elif not head_usable:
        reason = "the checkpoint's head sits on a pre-logits layer this model does not have"
    else:
        reason = f"the checkpoint's head has {checkpoint_classes} classes"
    log.warning("%s: new %d-class head, randomly initialised (%s)", where, num_classes, reason)
    return num_classes, True
