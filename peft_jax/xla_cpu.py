"""The XLA:CPU scheduler the launch scripts compile under.

XLA:CPU's default, concurrency-optimised scheduler runs independent operations side by side and
keeps more buffers alive for it. Off, on 2 cores, every ``compare_torch.py`` case had a smaller or
equal scratch buffer (EfficientNet-Lite0 full fine-tuning 0.68 GB against 1.64, ViT-B/16 LoRA 1.46
against 1.86) at 0.88-1.06x the step time (BENCHMARKS.md, "JAX step by XLA:CPU scheduler"). So the
launchers turn it off unless ``XLA_FLAGS`` already sets it
(``--xla_cpu_enable_concurrency_optimized_scheduler=true`` keeps XLA's default). The flag only concerns CPU compilations.
"""
from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_OFF = f"{SCHEDULER_FLAG}=false"


def scheduler_env(env: dict) -> dict:
    """``env`` with the concurrency-optimised scheduler off in XLA_FLAGS, unless the flag is already there."""
    flags = env.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG in flags:
        return dict(env)
    return {**env, "XLA_FLAGS": f"{flags} {SCHEDULER_OFF}".strip()}


def setup() -> None:
    """Sets the scheduler for this process and the processes it starts (before jax reads XLA_FLAGS)."""
    os.environ["XLA_FLAGS"] = scheduler_env(os.environ)["XLA_FLAGS"]
