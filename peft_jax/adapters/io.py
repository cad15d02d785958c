"""Adapter files: the trainable state (and any changed non-parameter state such as
BatchNorm statistics) in ``adapter.safetensors``, the method and its hyper-parameters
and a hash of the base weights in ``adapter_config.json``. Loading checks both, so an
adapter can only be put back on the backbone it was trained on."""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from peft_jax.adapters.core import Filter, path_str

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def state_hash(state: nnx.State) -> str:
    """sha256 over the sorted paths, shapes, dtypes and bytes of a state."""
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(state), key=lambda t: path_str(t[0])):
        value = np.asarray(var.get_value())
        h.update(f"{path_str(path)}:{value.shape}:{value.dtype}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def put_arrays(model: nnx.Module, filt, arrays: dict[str, np.ndarray], where: str, *,
               may_differ: Callable[[str], bool] = lambda key: False) -> set[str]:
    """Sets every variable of ``model`` that ``filt`` selects from ``arrays`` (keyed by ``path_str``).

    Any missing, unexpected or mis-shaped key is one error naming them, except variables for which
    ``may_differ(key)`` holds: those keep their value when the file has no fitting array (a new head,
    say). Returns the keys that were kept.
    """
    state = nnx.state(model, filt)
    expected = {path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}
    kept = {k for k in expected if may_differ(k) and (k not in arrays or arrays[k].shape != expected[k])}
    missing = sorted(set(expected) - set(arrays) - kept)
    unexpected = sorted(k for k in set(arrays) - set(expected) if not may_differ(k))
    wrong = [f"{k}: file {arrays[k].shape} vs model {expected[k]}" for k in expected
             if k in arrays and k not in kept and arrays[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {wrong[:5]}")
    for path, var in nnx.to_flat_state(state):
        if path_str(path) not in kept:
            var.set_value(jax.numpy.asarray(arrays[path_str(path)]))
    nnx.update(model, state)
    return kept


def save_adapter(directory: str | pathlib.Path, model: nnx.Module, trainable: Filter, *,
                 config: ml_collections.ConfigDict, base_hash: str, extra: dict | None = None) -> pathlib.Path:
    """Writes the adapter folder atomically (a temp folder renamed into place)."""
    directory = pathlib.Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    tmp.mkdir(parents=True)
    arrays = {"params/" + k: v for k, v in flat_arrays(nnx.state(model, trainable)).items()}
    arrays.update({"state/" + k: v for k, v in flat_arrays(nnx.state(model, nnx.BatchStat)).items()})
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ADAPTER_FILE))
    meta = {
        "format": "peft_jax.adapter/1",
        "model": config.model.to_dict(),
        "peft": config.peft.to_dict(),
        "base_hash": base_hash,
        **(extra or {}),
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)  # with anything written beside the adapter (e.g. exports)
    tmp.rename(directory)
    return directory


def read_adapter_config(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_FILE} and {CONFIG_FILE}")
    return json.loads(path.read_text())


def load_adapter(model: nnx.Module, directory: str | pathlib.Path, trainable: Filter, *,
                 base_hash: str | None, peft_config: ml_collections.ConfigDict | None = None) -> dict:
    """Loads an adapter onto a model that already has the method's surgery applied.

    Errors if the base weights' hash or the method config differ, or if any key or shape
    disagrees, naming them.
    """
    directory = pathlib.Path(directory)
    meta = read_adapter_config(directory)
    if base_hash is not None and meta["base_hash"] != base_hash:
        raise ValueError(
            f"adapter {directory} was trained on different base weights (hash {meta['base_hash'][:12]}..., "
            f"this backbone has {base_hash[:12]}...); load it onto the backbone it was trained on")
    if peft_config is not None:
        differ = {k: (meta["peft"].get(k), v) for k, v in peft_config.to_dict().items() if meta["peft"].get(k) != v}
        if differ:
            raise ValueError(f"adapter {directory} was trained with another PEFT config: "
                             + ", ".join(f"peft.{k}: adapter {a!r} vs {b!r}" for k, (a, b) in differ.items()))
    arrays = load_file(str(directory / ADAPTER_FILE))
    for prefix, filt in (("params/", trainable), ("state/", nnx.BatchStat)):
        got = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        put_arrays(model, filt, got, f"adapter {directory}")
    return meta
