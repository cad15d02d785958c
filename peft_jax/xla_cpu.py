"""The XLA:CPU scheduler the launch scripts compile under, and how they dispatch steps.

XLA:CPU's default, concurrency-optimised scheduler runs independent operations side by side and
keeps more buffers alive for it. Off, on 2 cores, every ``compare_torch.py`` case had a smaller or
equal scratch buffer (EfficientNet-Lite0 full fine-tuning 0.68 GB against 1.64, ViT-B/16 LoRA 1.46
against 1.86) at 0.88-1.06x the step time (BENCHMARKS.md, "JAX step by XLA:CPU scheduler"). So the
launchers turn it off unless ``XLA_FLAGS`` already sets it
(``--xla_cpu_enable_concurrency_optimized_scheduler=true`` keeps XLA's default). The flag only concerns CPU compilations.

JAX dispatches CPU computations asynchronously: a step's scratch buffer is freed only after its
outputs are ready, so the next step, already waiting on those outputs, can allocate its own first. With
tcmalloc or mimalloc (which keep freed memory, peft_jax/allocator.py) the process then holds two
scratch buffers from then on. Run inline (``jax_cpu_enable_async_dispatch=False``), a step returns
after freeing its buffer. Back to back, as the train loop runs them: ViT-B/16 LoRA peaked at 2.36 GB
inline and 3.82 GB async (tcmalloc), ResNet-50 full fine-tuning 2.45 and 3.51, and the async steps
took 0.98-1.16x the inline steps' time (BENCHMARKS.md, "Back-to-back train steps by CPU dispatch").
So the launchers dispatch inline unless ``PEFT_JAX_CPU_ASYNC_DISPATCH=1``; accelerators and
multi-device CPU computations are not affected.
"""
from __future__ import annotations

import os
import sys

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_OFF = f"{SCHEDULER_FLAG}=false"
ASYNC_DISPATCH_ENV = "PEFT_JAX_CPU_ASYNC_DISPATCH"


def scheduler_env(env: dict) -> dict:
    """``env`` with the concurrency-optimised scheduler off in XLA_FLAGS, unless the flag is already there."""
    flags = env.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG in flags:
        return dict(env)
    return {**env, "XLA_FLAGS": f"{flags} {SCHEDULER_OFF}".strip()}


def setup() -> None:
    """Sets the scheduler for this process and the processes it starts (before jax reads XLA_FLAGS)."""
    os.environ["XLA_FLAGS"] = scheduler_env(os.environ)["XLA_FLAGS"]


def async_dispatch(env: dict) -> bool:
    """Whether ``env`` asks for JAX's asynchronous CPU dispatch; a bad value is a user error."""
    value = env.get(ASYNC_DISPATCH_ENV, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ASYNC_DISPATCH_ENV}={value}: use 1 (JAX's asynchronous CPU dispatch) or 0 (the default, "
                         "inline: one scratch buffer at a time), or unset it")
    return value == "1"


def set_dispatch() -> None:
    """Sets JAX's CPU dispatch from the environment, before the CPU client starts (it reads the option then).
    A bad PEFT_JAX_CPU_ASYNC_DISPATCH is one error line, exit 2."""
    try:
        asynchronous = async_dispatch(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", asynchronous)
