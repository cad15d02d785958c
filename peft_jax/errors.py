"""The error contract of the launch scripts: a bad input is a ``UserError``, anything else is a bug.

``runtime.run`` prints a ``UserError`` as one ``error:`` line (it names the file or field and the fix)
and exits with code 2; every other exception keeps its traceback, so a ``KeyError`` deep in the
library is never passed off as the user's fault. It subclasses ``ValueError`` so that library
callers catching ``ValueError`` keep working.
"""
from __future__ import annotations

import ast
import functools
import os
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(ValueError):
    """A refused input: a config field, a flag, a file or a folder; the message says how to fix it."""


# What a launch script reports as the user's mistake (one ``error:`` line, exit code 2); anything else is a
# bug and keeps its traceback. FloatingPointError is training's non-finite stop, whose message says what to change.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FloatingPointError)


def fail(message: str) -> NoReturn:
    """Prints ``error: message`` and exits with code 2 (the user-error exit code of every launch script)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` with ``USER_ERRORS`` (and absl's ``UsageError``) turned into one ``error:`` line and exit 2.

    Set PEFT_JAX_DEBUG=1 for the full traceback too.
    """
    from absl import app

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (*USER_ERRORS, app.UsageError) as e:
            if os.environ.get("PEFT_JAX_DEBUG"):
                traceback.print_exc()
            fail(str(e).strip())
    return guarded


def _config_path(argv: list[str]) -> str | None:
    """The file of ``--config PATH[:ARG]`` / ``--config=PATH[:ARG]`` in ``argv``, if given there."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def check_config_file(path: str) -> None:
    """Refuses a config file that is missing, does not parse or defines no ``get_config``, naming the file:
    ml_collections would defer the first, print a traceback for the second and call the third a bad override."""
    file = pathlib.Path(path)
    if not file.is_file():
        fail(f"--config {path}: no such file; give the path of a config file such as configs/vit_b_lora.py")
    try:
        tree = ast.parse(file.read_bytes(), filename=path)
    except SyntaxError as e:
        fail(f"{path}, line {e.lineno}: {e.msg}; fix the config file")
    except (OSError, ValueError) as e:  # unreadable, or null bytes in it
        fail(f"--config {path}: cannot read it as a Python file ({e})")
    if "get_config" not in _module_names(tree):
        fail(f"{path} defines no get_config(); a config file is a module with def get_config(): returning the "
             "experiment's ml_collections.ConfigDict")


def _module_names(tree: ast.Module) -> set[str]:
    """The names a module's top level defines, assigns or imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name for a in node.names}
    return names


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors and those of the config file or its overrides as one ``error:`` line.

    A ``get_config`` that fails inside peft_jax code that it calls (not in the config file itself or
    ml_collections) is a bug and keeps its traceback.
    """
    from absl import flags

    path = _config_path(argv) if "config" in flags.FLAGS else None
    if path is not None:
        check_config_file(path)
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, USER_ERRORS):
            fail(str(cause).strip())
        frames = traceback.extract_tb(cause.__traceback__)
        config_file = pathlib.Path(path).resolve() if path else None
        in_config = [i for i, fr in enumerate(frames) if pathlib.Path(fr.filename).resolve() == config_file]
        ours = [i for i, fr in enumerate(frames) if _in_library(fr.filename)]
        if in_config and not [i for i in ours if i > in_config[-1]]:
            fail(f"{path}, line {frames[in_config[-1]].lineno}: {type(cause).__name__}: {_one_line(cause)}; "
                 "fix the config file")
        if ours:
            raise
        if isinstance(e, flags.Error):
            fail(f"{_one_line(e).rstrip('.')}; see --helpshort")
        if isinstance(cause, (AttributeError, KeyError, TypeError, ValueError)):
            fail(f"bad --config override: {_one_line(cause)}")
        raise


def _in_library(filename: str) -> bool:
    """Whether code in ``filename`` is peft_jax's own (this module aside: its frame catches the error)."""
    file = pathlib.Path(filename).resolve()
    return file != pathlib.Path(__file__).resolve() and pathlib.Path(__file__).resolve().parent in file.parents


def _root_cause(e: BaseException) -> BaseException:
    """The exception under absl's ``IllegalFlagValueError`` and ml_collections' re-raised copy of it."""
    from absl import flags

    while e.__context__ is not None and (isinstance(e, flags.Error) or
                                         str(e).startswith("Error whilst parsing config file")):
        e = e.__context__
    return e


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str() is its repr
    return str(text).replace("\n", " ")
