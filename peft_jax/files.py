"""Reading the small files the package keeps beside its data (adapter configs, dataset fingerprints)."""
from __future__ import annotations

import json
import pathlib
from typing import Any

from peft_jax.errors import UserError


def read_json(path: pathlib.Path, fix: str) -> Any:
    """A JSON file's content; one that does not parse is a UserError naming the file and ``fix``."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {fix}") from None


def read_safetensors(path: pathlib.Path, fix: str) -> dict:
    """A safetensors file's arrays (numpy); one that does not parse is a UserError naming the file and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # a truncated copy, another format under this name
        raise UserError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
