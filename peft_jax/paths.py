"""Variable paths as strings: the one spelling that filters, sharding rules, optimizer groups,
checkpoint converters and adapter files match their regexes and keys against."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def path_str(path: Sequence[Any]) -> str:
    """('blocks', 0, 'attn', 'query') -> 'blocks/0/attn/query'."""
    return "/".join(str(p) for p in path)


def keypath_str(keypath: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path (DictKey, SequenceKey, GetAttrKey entries) as ``path_str`` spells it.

    An NNX variable flattened as a pytree ends in a ``value`` entry; it is dropped, so the string
    names the variable itself.
    """
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)
    return path_str(keys[:-1] if keys and keys[-1] == "value" else keys)
