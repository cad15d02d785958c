"""SD 1.5 text-to-image PEFT: lora."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from sd15_common import get_config as _common  # noqa: E402


def get_config():
    c = _common("lora")
    c.peft.targets = r"attn[12]/(to_q|to_k|to_v|to_out)$"  # self- and cross-attention projections
    return c
