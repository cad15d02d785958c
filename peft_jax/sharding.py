"""Mesh and partition rules: regexes on variable paths -> PartitionSpecs.

The mesh has axes ("data", "fsdp"). The batch is split over both; a variable is split
over "fsdp" along the largest of its last two axes that the axis size divides (the
leading axis of a layer-stacked variable is never split, so a scan slices locally).
Variables smaller than ``mesh.min_shard_size`` are replicated. Frozen and trainable
state get their shardings from the same rules, each tree on its own.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from peft_jax.errors import UserError
from peft_jax.paths import keypath_str

# (regex on the variable path, spec): the first match wins; "auto" is the FSDP rule above.
DEFAULT_RULES: tuple[tuple[str, str | P], ...] = ((r".*", "auto"),)


def rules(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, str | P], ...]:
    """``mesh.rules`` (tried first), then DEFAULT_RULES. A config rule is ``(regex, spec)`` with spec
    "auto" or a tuple of mesh axis names / None per array axis, e.g. ``(("pos_embed$", ()),)``
    replicates the position embeddings and ``(("mlp/fc1/kernel$", (None, "fsdp")),)`` splits a kernel's
    output axis."""
    extra = []
    for entry in cfg.get("rules", ()):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UserError(f"mesh.rules: each entry must be (regex, spec), got {entry!r}")
        pattern, spec = entry
        bad = [a for a in ([] if spec == "auto" else spec) if a not in (None, "data", "fsdp")]
        if bad:
            raise UserError(f"mesh.rules: {pattern!r} names mesh axes {bad}; the mesh has 'data' and 'fsdp'")
        extra.append((pattern, spec if spec == "auto" else P(*spec)))
    return tuple(extra) + DEFAULT_RULES


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over the first data*fsdp devices (all processes' devices in multi-host runs)."""
    devices = list(devices if devices is not None else jax.devices())
    n = int(cfg.data) * int(cfg.fsdp)
    if n < 1 or n > len(devices):
        raise UserError(
            f"mesh.data x mesh.fsdp = {cfg.data} x {cfg.fsdp} = {n} devices, but {len(devices)} are available; "
            f"set them so that their product is at most {len(devices)}")
    grid = np.array(devices[:n]).reshape(int(cfg.data), int(cfg.fsdp))
    return Mesh(grid, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def auto_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size or len(shape) == 0:
        return P()
    candidates = [i for i in range(max(0, len(shape) - 2), len(shape)) if shape[i] % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, min_size: int,
             rules: Sequence[tuple[str, str | P]] = DEFAULT_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return auto_spec(shape, mesh.shape["fsdp"], min_size) if spec == "auto" else spec
    return P()


def tree_shardings(tree, mesh: Mesh, min_size: int, rules: Sequence[tuple[str, str | P]] = DEFAULT_RULES):
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs)."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(keypath_str(path), tuple(leaf.shape), mesh, min_size, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples are split over every device of the mesh."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def bytes_per_device(tree, shardings) -> int:
    """The largest number of bytes any one device holds of a sharded tree."""
    per_device: dict[int, int] = {}
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        shard = sharding.shard_shape(tuple(leaf.shape))
        nbytes = int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.mesh.devices.flat:
            per_device[device.id] = per_device.get(device.id, 0) + nbytes
    return max(per_device.values(), default=0)
