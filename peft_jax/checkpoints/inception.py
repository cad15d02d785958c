"""The FID Inception-v3 from pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``).

The file is a torch state dict in torchvision's names (``Mixed_6b.branch7x7_2.conv.weight``,
``Mixed_6b.branch7x7_2.bn.running_var``, ``fc.weight``). It is read with
``torch.load(weights_only=True)`` (or from a ``.safetensors`` copy) and walked along our
model's structure, so a key the model needs and the file lacks is reported as missing, a key
left over as unexpected, and a shape that differs as a mismatch, all in one error.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
from flax import nnx

from peft_jax.checkpoints.core import (
    CheckpointError, KeyMapper, Path, build, check_fit, expected_shapes, torch_conv, torch_linear,
)
from peft_jax.checkpoints.formats import TORCH_SUFFIXES, _read_safetensors, _read_torch
from peft_jax.checkpoints.registry import KNOWN_CHECKPOINTS, cache_dir, resolve_checkpoint
from peft_jax.models.inception import InceptionV3

ARCH = "inception_v3_fid"
REGISTERED = "inception_v3.fid"

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_source(path: Path) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The state-dict key of one model variable, and how its array is converted."""
    *module, leaf = (str(p) for p in path)
    prefix = ".".join(module)
    if module[-1] == "conv" and leaf == "kernel":
        return f"{prefix}.weight", lambda a: torch_conv(a) if a.ndim == 4 else a  # else: a shape mismatch
    if module[-1] == "bn" and leaf in _BN_NAMES:
        return f"{prefix}.{_BN_NAMES[leaf]}", lambda a: a
    if module == ["fc"] and leaf == "kernel":
        return "fc.weight", lambda a: torch_linear(a) if a.ndim == 2 else a
    if module == ["fc"] and leaf == "bias":
        return "fc.bias", lambda a: a
    raise ValueError(f"no torch name for model variable {'/'.join(map(str, path))}")


def convert(arrays: dict[str, np.ndarray], expected: dict[Path, tuple[int, ...]]) -> KeyMapper:
    """Maps the state dict onto every model variable; BatchNorm's num_batches_tracked is dropped."""
    m = KeyMapper(arrays)
    for path in expected:
        key, fn = torch_source(path)
        m.map(path, key, fn)
        if path[-2] == "bn" and path[-1] == "mean":
            m.drop(".".join(str(p) for p in path[:-1]) + ".num_batches_tracked")
    return m


def _weights_file(path: str | pathlib.Path) -> pathlib.Path:
    """A weights file, or the registered name's cached (or downloaded) copy; a missing file says where to get it."""
    candidate = pathlib.Path(path).expanduser()
    if candidate.exists() or str(path) in KNOWN_CHECKPOINTS:
        return resolve_checkpoint(path, arch=ARCH)
    ckpt = KNOWN_CHECKPOINTS[REGISTERED]
    raise CheckpointError(
        f"{candidate}: no such Inception weights file; download {ckpt.url} and pass its path, "
        f"or save it as {cache_dir() / ckpt.filename}, where the name {REGISTERED!r} finds it"
    )


def read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The state dict of a .pth (weights_only) or .safetensors file."""
    if path.is_dir() or path.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CheckpointError(f"{path}: expected a torch state dict ({', '.join(TORCH_SUFFIXES)}) or .safetensors file")
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def from_pretrained(path: str | pathlib.Path = REGISTERED, *, resize_input: bool = True,
                    rngs: nnx.Rngs | None = None) -> InceptionV3:
    """The FID Inception-v3 with pytorch-fid's weights (a file path, or the registered name), in eval mode."""
    file = _weights_file(path)

    def ctor(r):
        return InceptionV3(resize_input=resize_input, rngs=r)

    expected = expected_shapes(ctor)
    m = convert(read_weights(file), expected)
    check_fit(f"{file} (pytorch-fid Inception-v3)", m, m.converted, expected)
    return build(ctor, {p: a for p, (_, a) in m.converted.items()}, rngs=rngs if rngs is not None else nnx.Rngs(0))
