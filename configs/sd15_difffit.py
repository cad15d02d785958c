"""SD 1.5 text-to-image PEFT: difffit."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from sd15_common import get_config as _common  # noqa: E402


def get_config():
    c = _common("difffit")
    return c
