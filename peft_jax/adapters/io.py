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
from safetensors.numpy import save_file

from peft_jax.adapters.core import Filter, path_str
from peft_jax.errors import UserError
from peft_jax.files import read_json, read_safetensors

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


def fitting_arrays(model: nnx.Module, filt, arrays: dict[str, np.ndarray], where: str, *,
                   may_differ: Callable[[str], bool] = lambda key: False) -> dict[str, np.ndarray]:
    """The arrays (keyed by ``path_str``) for the variables of ``model`` that ``filt`` selects, after checking
    their names, shapes and dtypes: any problem is one error naming them. Variables for which
    ``may_differ(key)`` holds may have no fitting array (a new head, say): they are left out."""
    expected = flat_arrays(nnx.state(model, filt))
    kept = {k for k in expected if may_differ(k) and (k not in arrays or arrays[k].shape != expected[k].shape)}
    missing = sorted(set(expected) - set(arrays) - kept)
    unexpected = sorted(k for k in set(arrays) - set(expected) if not may_differ(k))
    wrong = [f"{k}: file {arrays[k].shape} vs model {expected[k].shape}" for k in expected
             if k in arrays and k not in kept and arrays[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {wrong[:5]}")
    dtypes = [f"{k}: file {arrays[k].dtype} vs model {expected[k].dtype}" for k in expected
              if k not in kept and arrays[k].dtype != expected[k].dtype]
    if dtypes:
        raise UserError(f"{where} holds arrays of another dtype: {', '.join(dtypes[:5])}; "
                         "save the adapter again from the model it was trained as")
    return {k: arrays[k] for k in expected if k not in kept}


def put_arrays(model: nnx.Module, arrays: dict[str, np.ndarray], filters, where: str, *,
               may_differ: Callable[[str], bool] = lambda key: False) -> set[str]:
    """Sets the variables of ``model`` from a file's ``arrays``: for each ``(prefix, filter)`` of ``filters``, the
    variables ``filter`` selects from the arrays named ``prefix + path``. Every group is checked
    (``fitting_arrays``) before anything changes. Returns the names of the arrays that were set."""
    checked = [(prefix, filt, fitting_arrays(model, filt, {k[len(prefix):]: v for k, v in arrays.items()
                                                           if k.startswith(prefix)}, where, may_differ=may_differ))
               for prefix, filt in filters]
    for _, filt, got in checked:
        state = nnx.state(model, filt)
        for path, var in nnx.to_flat_state(state):
            if path_str(path) in got:
                var.set_value(jax.numpy.asarray(got[path_str(path)]))
        nnx.update(model, state)
    return {prefix + k for prefix, _, got in checked for k in got}


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
    """adapter_config.json, refused (naming the file) unless it parses and holds the method config."""
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_FILE} and {CONFIG_FILE}")
    meta = read_json(path, "save the adapter again")
    _require(path, meta, "peft")
    return meta


def _require(path: pathlib.Path, meta: dict, key: str) -> None:
    if not isinstance(meta, dict) or key not in meta:
        raise UserError(f"{path} lacks {key!r}: it was not written by save_adapter (or was edited); save the "
                         "adapter again")


def _check_method(directory: pathlib.Path, stored: dict, model: nnx.Module,
                  peft_config: ml_collections.ConfigDict | None) -> None:
    """Every field of the stored method config (rank, alpha, targets, ...) must equal the one the model was built with."""
    if peft_config is not None:
        built = json.loads(json.dumps(peft_config.to_dict()))
    elif getattr(model, "peft_applied", None) is not None:
        built = json.loads(model.peft_applied)
    else:
        raise UserError(f"adapter {directory}: the model has no PEFT surgery recorded; apply_peft(model, peft) "
                         "first or pass peft_config")
    differ = {k: (stored.get(k), built.get(k)) for k in sorted(set(stored) | set(built)) if stored.get(k) != built.get(k)}
    if differ:
        raise UserError(f"adapter {directory} was trained with another PEFT config: "
                         + ", ".join(f"peft.{k}: adapter {a!r} vs {b!r}" for k, (a, b) in differ.items()))


def load_adapter(model: nnx.Module, directory: str | pathlib.Path, trainable: Filter, *,
                 base_hash: str | None, peft_config: ml_collections.ConfigDict | None = None) -> dict:
    """Loads an adapter onto a model that already has the method's surgery applied.

    Errors if the base weights' hash or any field of the method config differs (from
    ``peft_config``, else from the config ``apply_peft`` recorded on the model), or if any key,
    shape or dtype disagrees, naming them.
    """
    directory = pathlib.Path(directory)
    meta = read_adapter_config(directory)
    _require(directory / CONFIG_FILE, meta, "base_hash")
    if base_hash is not None and meta["base_hash"] != base_hash:
        raise UserError(
            f"adapter {directory} was trained on different base weights (hash {str(meta['base_hash'])[:12]}..., "
            f"this backbone has {base_hash[:12]}...); load it onto the backbone it was trained on")
    _check_method(directory, meta["peft"], model, peft_config)
    arrays = read_safetensors(directory / ADAPTER_FILE, "save or copy the adapter again")
    put_arrays(model, arrays, (("params/", trainable), ("state/", nnx.BatchStat)), f"adapter {directory}")
    return meta
