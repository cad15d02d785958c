"""The PEFT core: adapter variable types, module surgery, the method registry and the filter.

A PEFT method is two things (DESIGN.md): *surgery* that wraps or replaces submodules and
adds new variables, and a *trainable filter* that says which variables train. New
variables are ``AdapterParam`` / ``nnx.LoRAParam`` (both ``nnx.Param`` subclasses), so
they are trainable by construction; methods that tune existing weights select them by
a regex on the variable's path. Everything else (gradients, optimizer state,
checkpoints, sharding) is derived from the one filter.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx

from peft_jax.errors import UserError
from peft_jax.models.vit import LayerShared
from peft_jax.names import METHOD_FAMILIES, check_method, unknown_name_error
from peft_jax.paths import path_str  # noqa: F401  (the method files import it from here)


class AdapterParam(nnx.Param):
    """A parameter that a PEFT method added to the model (prompts, scales, bottlenecks)."""


class SharedAdapterParam(AdapterParam, LayerShared):
    """An added parameter that every block uses (FacT's factors); a scanned ViT does not stack it."""


# The variable types that only exist because a PEFT method added them.
ADAPTER_TYPES = (AdapterParam, nnx.LoRAParam)

Path = tuple[Any, ...]
Filter = Callable[[Path, Any], bool]

HEAD_PATTERN = r"^head/"
# Wrappers keep the module they wrap as ``.base``; path regexes on tuned weights allow it.
WRAPPED = r"(?:base/)*"


def path_regex(pattern: str) -> Filter:
    """A variable filter matching ``re.search(pattern, 'a/b/0/kernel')`` on the variable path."""
    compiled = re.compile(pattern)

    def matches(path: Path, _value: Any) -> bool:
        return compiled.search(path_str(path)) is not None

    matches.__name__ = f"path_regex({pattern!r})"
    return matches


def adapter_variables(path: Path, value: Any) -> bool:
    """Filter: variables a PEFT method added."""
    del path
    return isinstance(value, ADAPTER_TYPES)


def any_of(*filters: Filter) -> Filter:
    preds = [nnx.filterlib.to_predicate(f) for f in filters]

    def either(path: Path, value: Any) -> bool:
        return any(p(path, value) for p in preds)

    return either


def modules_matching(model: nnx.Module, types: tuple[type, ...], pattern: str | None = None,
                     exclude: str | None = HEAD_PATTERN) -> list[tuple[Path, nnx.Module]]:
    """Submodules of the given types whose path matches ``pattern`` (and not ``exclude``)."""
    found = []
    for path, module in nnx.iter_modules(model):
        if not path or not isinstance(module, types):
            continue
        # Match on the logical path: a layer wrapped by another method keeps its name.
        logical = path_str(tuple(p for p in path if p != "base"))
        if pattern is not None and not re.search(pattern, logical):
            continue
        if exclude is not None and re.search(exclude, logical + "/"):
            continue
        found.append((path, module))
    return found


def get_module(model: nnx.Module, path: Path) -> nnx.Module:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def replace_module(model: nnx.Module, path: Path, new: nnx.Module) -> None:
    """Puts ``new`` where ``path`` points (an attribute or an ``nnx.List`` slot)."""
    parent = get_module(model, path[:-1])
    key = path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def wrap_modules(model: nnx.Module, types: tuple[type, ...], pattern: str | None,
                 wrap: Callable[[Path, nnx.Module], nnx.Module], *, what: str) -> int:
    """Replaces every matching submodule by ``wrap(path, module)``; errors if none matched.

    Deepest modules are wrapped first, so wrapping a parent never hides a child.
    """
    targets = modules_matching(model, types, pattern)
    if not targets:
        raise UserError(
            f"{what}: no {'/'.join(t.__name__ for t in types)} module matches {pattern!r}. "
            f"Module paths look like {[path_str(p) for p, _ in list(nnx.iter_modules(model))[:4]]}")
    for path, module in sorted(targets, key=lambda t: -len(t[0])):
        replace_module(model, path, wrap(path, module))
    return len(targets)


def leading_shape(kernel: jax.Array, core_ndim: int) -> tuple[int, ...]:
    """Leading (stacked-layer) axes of a parameter, for models built with ``scan_layers``.

    Adapter parameters get the same leading axes, so a scanned model scans them too.
    """
    return tuple(kernel.shape[: kernel.ndim - core_ndim])


def is_scanned(model: nnx.Module) -> bool:
    """True for a ViT built with ``scan_layers``: its blocks are one module with a leading layer axis."""
    return bool(getattr(getattr(model, "config", None), "scan_layers", False))


def adapter_dropout(model: nnx.Module, rate: float, rngs: nnx.Rngs, *, what: str,
                    inside_blocks: bool = True) -> nnx.Dropout:
    """Dropout inside an adapter, with its own random stream (state that advances every step).

    Inside the blocks of a scanned ViT the stream is stacked like the blocks (one key and
    count per layer), so each layer draws its own masks and the scan carries the counts out.
    """
    if rate < 0 or rate >= 1:
        raise UserError(f"{what}: dropout must be in [0, 1), got {rate}")
    if rate == 0:
        return nnx.Dropout(0.0)
    key = rngs.params()
    if inside_blocks and is_scanned(model):
        @nnx.split_rngs(splits=model.config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(layer_rngs: nnx.Rngs) -> nnx.Dropout:
            return nnx.Dropout(rate, rngs=layer_rngs)

        return stacked(nnx.Rngs(dropout=key))
    return nnx.Dropout(rate, rngs=nnx.Rngs(dropout=key))


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Method:
    """One PEFT method: surgery, the variables it trains, and how to merge it away."""

    name: str
    doc: str
    trainable: Callable[[ml_collections.ConfigDict], Filter]
    surgery: Callable[[nnx.Module, ml_collections.ConfigDict, nnx.Rngs], None] | None = None
    merge: Callable[[nnx.Module], None] | None = None
    archs: tuple[str, ...] = ("vit", "cnn")  # families: peft_jax.names.FAMILIES


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"PEFT method {method.name!r} registered twice")
    if METHOD_FAMILIES.get(method.name) != method.archs:
        raise ValueError(f"PEFT method {method.name!r}: peft_jax/names.py METHOD_FAMILIES must list {method.archs}")
    METHODS[method.name] = method
    return method


def method_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """``peft.method`` may combine methods with '+', e.g. 'vpt_deep+bitfit'."""
    names = [n.strip() for n in str(cfg.method).split("+") if n.strip()]
    if not names:
        raise UserError("peft.method is empty; valid names: " + ", ".join(sorted(METHODS)))
    for n in names:
        if n not in METHODS:
            raise unknown_name_error("PEFT method (peft.method)", n, sorted(METHODS))
    return names


def arch_family(model: nnx.Module) -> str:
    """'vit', 'cnn' (ResNet, EfficientNet-Lite) or 'unet': which methods apply (peft_jax.names)."""
    from peft_jax.models.diffusion.unet import UNet2DConditionModel
    from peft_jax.models.vit import ViT

    if isinstance(model, UNet2DConditionModel):
        return "unet"
    return "vit" if isinstance(model, ViT) else "cnn"


def trainable_filter(cfg: ml_collections.ConfigDict) -> Filter:
    """The one filter: what trains under ``peft.method``. The head always trains."""
    return any_of(path_regex(HEAD_PATTERN), *(METHODS[n].trainable(cfg) for n in method_names(cfg)))


def apply_peft(model: nnx.Module, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Performs the surgery of ``peft.method`` on ``model`` in place and returns it."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    for name in check_method(cfg.method, arch_family(model)):
        method = METHODS[name]
        if method.surgery is not None:
            method.surgery(model, cfg, rngs)
    # The method config this surgery was built with (static): load_adapter checks an adapter against it.
    model.peft_applied = json.dumps(cfg.to_dict(), sort_keys=True)
    return model


def merge(model: nnx.Module, cfg: ml_collections.ConfigDict) -> nnx.Module:
    """Folds re-parameterisable adapters into the backbone: same outputs, no adapter variables."""
    # Surgeries wrap leaf layers, so a later method's wrapper sits inside an earlier one's:
    # merge in reverse order, innermost first.
    for name in reversed(method_names(cfg)):
        method = METHODS[name]
        if method.surgery is not None and method.merge is None:
            raise UserError(f"PEFT method {name!r} adds modules that cannot be merged into the backbone")
        if method.merge is not None:
            method.merge(model)
    left = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Any(*ADAPTER_TYPES)))]
    if left:
        raise RuntimeError(f"merge left adapter variables behind: {left[:5]}")
    return model


# --------------------------------------------------------------------------- reporting


def param_report(model: nnx.Module, trainable: Filter) -> dict[str, Any]:
    """Trainable / total parameter counts, overall and per group (head, added, tuned)."""
    params = nnx.state(model, nnx.Param)
    head = path_regex(HEAD_PATTERN)
    groups = {"head": 0, "added": 0, "tuned": 0, "frozen": 0}
    is_trainable = nnx.filterlib.to_predicate(trainable)
    for path, var in nnx.to_flat_state(params):
        n = int(var.get_value().size)
        if not is_trainable(path, var):
            groups["frozen"] += n
        elif head(path, var):
            groups["head"] += n
        elif isinstance(var, ADAPTER_TYPES):
            groups["added"] += n
        else:
            groups["tuned"] += n
    total = sum(groups.values())
    trainable_n = total - groups["frozen"]
    return {
        "trainable_params": trainable_n,
        "total_params": total,
        "trainable_percent": 100.0 * trainable_n / max(total, 1),
        "groups": groups,
    }


def iter_wrapped(model: nnx.Module, wrapper_type: type) -> Iterator[tuple[Path, nnx.Module]]:
    """Wrappers of one type, deepest first (for merging nested wrappers inside out)."""
    found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, wrapper_type)]
    return iter(sorted(found, key=lambda t: -len(t[0])))
