"""Process set-up shared by the launch scripts: the XLA:CPU scheduler, the allocator and friendly errors.

``setup()`` turns XLA:CPU's concurrency-optimised scheduler off (``peft_jax/xla_cpu.py`` says why;
``XLA_FLAGS`` that set it win), re-executes the script under tcmalloc or mimalloc
(``peft_jax/allocator.py`` says why and how to choose; ``PEFT_JAX_ALLOCATOR=default`` opts out) and
dispatches CPU steps inline (``xla_cpu.py`` again; ``PEFT_JAX_CPU_ASYNC_DISPATCH=1`` opts out).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from peft_jax import allocator, xla_cpu


def setup() -> None:
    """Compiles with the smaller-memory scheduler and runs the script under a malloc that keeps XLA's scratch
    buffer (may re-execute it), one scratch buffer at a time; before jax's CPU client starts."""
    xla_cpu.setup()
    allocator.reexec()
    xla_cpu.set_dispatch()


# ``--config.a.b=None`` overrides, taken out of argv before absl parses it (ml_collections would parse
# "None" as the field's type and fail); ``checked_config`` applies them.
NONE_OVERRIDES: list[str] = []


def pop_none_overrides(argv: list[str]) -> list[str]:
    """Removes ``--config.a.b=None`` from ``argv`` (in place) and returns the dotted keys."""
    keys = [a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.") and
            a.endswith("=None")]
    argv[:] = [a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))]
    return keys


def reset_optional_fields(cfg, keys: list[str]):
    """``cfg`` with the optional fields ``keys`` set back to None; a field that needs a value is refused."""
    from ml_collections import FieldReference

    from peft_jax.config import with_values
    from peft_jax.errors import UserError

    for key in keys:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p] if p in node else None
            if node is None:
                break
        field = getattr(node, "_fields", {}).get(leaf) if node is not None else None
        if node is not None and leaf in node and not (isinstance(field, FieldReference) or node[leaf] is None):
            raise UserError(f"--config.{key}=None: {key} is not optional; give it a value")
    return with_values(cfg, {k: None for k in keys}, "--config ...=None")


def checked_config(cfg, *, names: bool = True, free: tuple[str, ...] = ()):
    """The ``--config`` flag's config with its ``=None`` overrides applied, refused when its file has a key
    the schema lacks or (``names``) an unknown model, dataset or method: before the launcher's heavy
    imports, so a typo costs a second."""
    from absl import flags
    from ml_collections import config_flags

    from peft_jax.config import check_config_keys
    from peft_jax.names import check_names

    check_config_keys(cfg, config_flags.get_config_filename(flags.FLAGS["config"]), free=free)
    cfg = reset_optional_fields(cfg, NONE_OVERRIDES)
    if names:
        check_names(cfg)
    return cfg


def init_distributed(cfg) -> None:
    """Joins a multi-process run when ``distributed.enabled`` (before any other JAX call).

    Unset fields fall back to JAX's own detection (SLURM, TPU pods, JAX_* environment variables).
    On CPUs the processes talk through gloo collectives.
    """
    if not cfg.distributed.enabled:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    kwargs = {k: cfg.distributed[k] for k in ("coordinator_address", "num_processes", "process_id")
              if cfg.distributed[k] is not None}
    jax.distributed.initialize(**kwargs)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` under the error contract (peft_jax/errors.py): a bad flag, config file, override or input
    is one ``error:`` line and exit code 2; anything else is a bug and keeps its traceback.
    """
    from absl import app, logging

    from peft_jax import errors

    @errors.guard
    def quiet_main(argv: list[str]) -> None:
        if not os.environ.get("PEFT_JAX_DEBUG"):
            logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
        main(argv)

    NONE_OVERRIDES[:] = pop_none_overrides(sys.argv)
    app.run(quiet_main, flags_parser=errors.parse_flags)
