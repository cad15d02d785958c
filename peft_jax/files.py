"""Reading the small files the package keeps beside its data (adapter configs, dataset fingerprints)."""
from __future__ import annotations

import json
import pathlib
from typing import Any


def read_json(path: pathlib.Path, fix: str) -> Any:
    """A JSON file's content; one that does not parse is a ValueError naming the file and ``fix``."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
