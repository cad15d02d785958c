"""Search spaces and fixed overrides written as short strings in a config file.

A *spec* is a ``;``-separated list of ``key=value`` entries whose keys are dotted config
fields. A value is either fixed (a Python literal or a bare word) or a distribution:

    "train.lr=log(1e-4, 1e-1); train.weight_decay=log(1e-6, 1e-2); peft.rank=choice(4, 8, 16)"

``log(a, b)`` log-uniform float, ``uniform(a, b)`` uniform float, ``int(a, b)`` and
``logint(a, b)`` integers, ``choice(v1, v2, ...)`` categorical. Strings keep specs editable
from the command line (``--config.sweep.space.lora="train.lr=log(1e-4,1e-2)"``).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import re
from typing import TYPE_CHECKING, Any

import ml_collections

from peft_jax.errors import UserError

if TYPE_CHECKING:  # optuna (the hpo extra) is needed by sweeps only, not by a fixed grid
    import optuna

# Top-level config sections that describe a sweep or a benchmark, not one training run.
DRIVER_SECTIONS = ("sweep", "benchmark")

_DIST = re.compile(r"^(log|uniform|int|logint|choice)\((.*)\)$", re.S)


@dataclasses.dataclass(frozen=True)
class Dist:
    """One searched field: ``kind`` is log, uniform, int, logint or choice."""

    kind: str
    args: tuple

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.args))
        low, high = self.args
        if self.kind in ("int", "logint"):
            return trial.suggest_int(name, int(low), int(high), log=self.kind == "logint")
        return trial.suggest_float(name, float(low), float(high), log=self.kind == "log")


def _literal(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as lora or qv


def _split_args(text: str) -> list[str]:
    return [a for a in (s.strip() for s in text.split(",")) if a]


def parse_spec(spec: str, where: str = "spec") -> dict[str, Any]:
    """``{dotted key: fixed value or Dist}`` from a spec string; ``where`` names it in errors."""
    out: dict[str, Any] = {}
    for entry in (e.strip() for e in (spec or "").split(";")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"{where}: bad entry {entry!r}; write key=value, e.g. train.lr=log(1e-4, 1e-2)")
        m = _DIST.match(value)
        if not m:
            out[key] = _literal(value)
            continue
        kind, args = m.group(1), tuple(_literal(a) for a in _split_args(m.group(2)))
        if kind == "choice":
            if not args:
                raise UserError(f"{where}: {key}=choice() needs at least one value")
        elif len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise UserError(f"{where}: {key}={value} needs two numbers low < high, e.g. {kind}(1e-4, 1e-2)")
        elif kind in ("log", "logint") and args[0] <= 0:
            raise UserError(f"{where}: {key}={value} is log-scaled, so its lower bound must be > 0")
        out[key] = Dist(kind, args)
    return out


def searched(spec: dict[str, Any]) -> dict[str, Dist]:
    return {k: v for k, v in spec.items() if isinstance(v, Dist)}


def space_for(sweep: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The search space of one method: ``sweep.space.common`` then the method's own entries.

    A combined method (``lora+bitfit``) without its own entry takes the union of its parts.
    """
    spaces = sweep.space
    space = parse_spec(spaces.get("common", ""), "sweep.space.common")
    if method in spaces:
        names = [method]
    else:
        names = [m for m in method.split("+") if m in spaces]
    for name in names:
        space.update(parse_spec(spaces[name], f"sweep.space.{name}"))
    if not searched(space):
        raise UserError(f"no searched field for method {method!r}: add sweep.space.common or sweep.space.{method} "
                         "with a distribution, e.g. 'train.lr=log(1e-4, 1e-1)'")
    return space


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """One value per field: fixed values as given, distributions sampled by the trial."""
    return {k: v.suggest(trial, k) if isinstance(v, Dist) else v for k, v in space.items()}


def sweep_section(num_trials: int = 8, min_resource: int = 20, max_resource: int | None = None,
                  space: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """The ``sweep`` section of a config file, with every field and its default."""
    s = ml_collections.ConfigDict()
    s.num_trials = num_trials  # trials in the study (all hosts and workers together)
    s.min_resource = min_resource  # training steps before the first ASHA rung
    s.max_resource = ml_collections.FieldReference(max_resource, field_type=int)  # None: train.num_steps
    s.reduction_factor = 4  # ASHA keeps the best 1/4 of the trials at each rung
    s.eval_every = ml_collections.config_dict.placeholder(int)  # trial validation interval (None: min_resource)
    s.storage = ml_collections.config_dict.placeholder(str)  # SQLAlchemy URL (None: sqlite in the workdir)
    s.study_name = ml_collections.config_dict.placeholder(str)  # None: the workdir's name
    s.seed = 0  # sampler seed: trial n samples with a seed drawn from (seed, n), so no two trials share one
    s.space = ml_collections.ConfigDict(space or {})  # method name or "common" -> spec (see peft_jax.hpo.space)
    return s


def run_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of one training run: without the sweep/benchmark sections, so that editing
    those (more seeds, another method) never makes a run's workdir look like another experiment."""
    new = copy.deepcopy(cfg)
    new.unlock()
    for name in DRIVER_SECTIONS:
        if name in new:
            del new[name]
    new.lock()
    return new


def format_flag(key: str, value: Any) -> str:
    """One ``--config.key=value`` line as ``launch/train.py`` (absl) parses it."""
    return f"--config.{key}={value}"
