"""Which malloc the launch scripts run under, and the re-exec that preloads it.

XLA:CPU frees and re-allocates its scratch buffer (1-2 GB for a ViT-B/16 step) every step. glibc
malloc hands such blocks back to the kernel at once, so every step page-faults them in again
(steps 1.1-1.4x as long, BENCHMARKS.md); tcmalloc and mimalloc keep them. The launchers take, in
order: tcmalloc from the system package (``apt-get install libtcmalloc-minimal4``), mimalloc from
the ``cmeel-mimalloc`` wheel that ``pip install`` brings on Linux, else glibc.
``PEFT_JAX_ALLOCATOR=tcmalloc|mimalloc|default`` picks one (``default``: the process's own malloc);
``PEFT_JAX_TCMALLOC=0``, the older switch, still means ``default``.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from importlib import metadata

TCMALLOC_GLOBS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc.so.4", "/usr/lib/libtcmalloc*.so*")
NAMES = ("tcmalloc", "mimalloc", "default")
# mimalloc returns freed memory to the kernel after 10 ms by default, which brings the per-step page
# faults back; -1 keeps it (the scratch buffer is re-used at the next step anyway).
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}


def find_tcmalloc() -> str | None:
    """The system tcmalloc's path, or None."""
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    name = ctypes.util.find_library("tcmalloc_minimal")
    return name if name and os.path.isabs(name) else None


def find_mimalloc() -> str | None:
    """libmimalloc.so from the ``cmeel-mimalloc`` wheel, wherever pip put it, or None (not installed:
    the wheel exists for Linux x86_64/aarch64 and macOS only)."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    libs = sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so."))
    return next((lib for lib in libs if os.path.exists(lib)), None)


FINDERS = {"tcmalloc": find_tcmalloc, "mimalloc": find_mimalloc}


def requested(env: dict) -> str:
    """The allocator ``env`` asks for: one of NAMES or 'auto'; a bad value is a user error."""
    name = env.get("PEFT_JAX_ALLOCATOR", "").strip().lower()
    if not name:
        return "default" if env.get("PEFT_JAX_TCMALLOC") == "0" else "auto"
    if name not in NAMES + ("auto",):
        raise ValueError(f"PEFT_JAX_ALLOCATOR={name}: unknown allocator; use one of {', '.join(NAMES)} or auto")
    return name


def choose(env: dict) -> tuple[str, str | None]:
    """(name, library path) of the allocator to preload: the requested one, or the first one found."""
    name = requested(env)
    if name == "default":
        return "default", None
    if name != "auto":
        lib = FINDERS[name]()
        if lib is None:
            hint = "apt-get install libtcmalloc-minimal4" if name == "tcmalloc" else "pip install cmeel-mimalloc"
            raise ValueError(f"PEFT_JAX_ALLOCATOR={name}: the library is not installed; {hint}, or unset it")
        return name, lib
    for candidate, finder in FINDERS.items():
        lib = finder()
        if lib:
            return candidate, lib
    return "default", None


def preload_env(name: str, lib: str | None, env: dict) -> dict:
    """``env`` for a process that runs under ``name`` (``lib`` preloaded, with its settings); the
    benchmarks start their workers with it too, so they measure what the launchers do."""
    env = dict(env)
    rest = " ".join(p for p in env.pop("LD_PRELOAD", "").split() if "tcmalloc" not in p and "mimalloc" not in p)
    if lib:
        env["LD_PRELOAD"] = (lib + " " + rest).strip()
    elif rest:
        env["LD_PRELOAD"] = rest
    if name == "mimalloc":
        env = {**MIMALLOC_ENV, **env}
    return env


def loaded() -> str:
    """The allocator this process runs under, read from its memory map."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((n for n in FINDERS if f"lib{n}" in maps), "default")


def reexec() -> None:
    """Re-executes the running script under the chosen allocator unless it already runs under it (or
    the platform has no /proc, i.e. is not Linux). A bad PEFT_JAX_ALLOCATOR is one error line, exit 2."""
    if not os.path.exists("/proc/self/maps"):
        return
    try:
        name, lib = choose(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    current = loaded()
    if lib is None or current == name or (current != "default" and requested(os.environ) == "auto"):
        return  # already under it, or under another allocator the user preloaded
    if os.environ.get("PEFT_JAX_ALLOCATOR_REEXEC"):  # preloaded once and still absent: ld.so refused it
        print(f"[peft_jax] could not preload {lib}; running on the default allocator", file=sys.stderr)
        return
    print(f"[peft_jax] using {name} ({lib}); set PEFT_JAX_ALLOCATOR=default to use the default allocator",
          file=sys.stderr)
    sys.stderr.flush()
    env = dict(preload_env(name, lib, os.environ), PEFT_JAX_ALLOCATOR_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
