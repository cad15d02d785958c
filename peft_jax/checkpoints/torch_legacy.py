"""PyTorch's legacy (pre-1.6, non-zip) ``torch.save`` format, read without torch and without trust.

The file is five pickles and then raw data: the magic number, the protocol version, a
system-info dict, the state dict itself (each tensor a ``_rebuild_tensor_v2`` call on a
storage that is only named, by a persistent id), the list of storage keys, and then for
each key an int64 element count followed by that storage's little-endian bytes. The
unpickler resolves only the globals a plain state dict needs (``OrderedDict``, the tensor
rebuild function, the storage types); anything else (``os.system``, ``builtins.eval``, ...)
is refused before it can be called, so an untrusted file runs no code.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pathlib
import pickle
import struct

import numpy as np

from peft_jax.checkpoints.core import CheckpointError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def is_legacy_torch_file(path: pathlib.Path) -> bool:
    """A legacy file starts with the pickled magic number (protocol 2, LONG1 of 10 bytes)."""
    with open(path, "rb") as f:
        head = f.read(14)
    return head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == MAGIC_NUMBER


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type
    numel: int


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
    """A tensor whose storage bytes come after the pickle: filled in once they are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _PendingTensor:
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor must be built on a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict; storages become placeholders."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and pid[5] is None):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, _view = pid
        return _Storage(str(key), storage_type.dtype, int(numel))


def _read_storages(f: io.BufferedReader, keys: list, storages: dict[str, _Storage]) -> dict[str, np.ndarray]:
    data = {}
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != storage.numel:
            raise CheckpointError(f"storage {key}: {numel} elements on disk, {storage.numel} in the pickle")
        nbytes = numel * np.dtype(storage.dtype).itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(f"storage {key}: the file ends after {len(raw)} of {nbytes} bytes")
        data[key] = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    return data


def _materialise(t: _PendingTensor, data: dict[str, np.ndarray]) -> np.ndarray:
    flat = data[t.storage.key]
    if len(t.shape) != len(t.stride) or min(t.stride, default=0) < 0:
        raise CheckpointError(f"tensor of shape {t.shape} has strides {t.stride}")
    if 0 not in t.shape and t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) >= flat.size:
        raise CheckpointError(f"tensor of shape {t.shape} reaches past its storage {t.storage.key}")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, [s * item for s in t.stride], writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _collect_storages(obj: dict) -> dict[str, _Storage]:
    return {t.storage.key: t.storage for t in obj.values() if isinstance(t, _PendingTensor)}


def _read_pickles(f: io.BufferedReader) -> tuple[dict, dict[str, np.ndarray]]:
    load = lambda: _TensorsOnlyUnpickler(f).load()  # noqa: E731
    if load() != MAGIC_NUMBER or load() != PROTOCOL_VERSION:
        raise CheckpointError("not a legacy torch file (magic number or protocol differ)")
    sys_info = load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise CheckpointError("big-endian torch files are not supported")
    obj, keys = load(), load()
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, found a {type(obj).__name__}")
    storages = _collect_storages(obj)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise CheckpointError("the storage list does not match the tensors of the state dict")
    return obj, _read_storages(f, keys, storages)


def read_legacy_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The flat {name: array} state dict of a legacy torch file (floats as float32)."""
    try:
        with open(path, "rb") as f:
            obj, data = _read_pickles(f)
        arrays = {}
        for k, v in obj.items():
            if not isinstance(v, _PendingTensor):
                raise CheckpointError(f"{k!r} is a {type(v).__name__}, not a tensor")
            a = _materialise(v, data)
            arrays[k] = a.astype(np.float32) if a.dtype.kind == "f" else a
        return arrays
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, struct.error, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: refused as a legacy torch weights file ({type(e).__name__}: {e})") from None
