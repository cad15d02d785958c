"""Hyper-parameter search (``sweep``: ASHA over Optuna studies) and the paper's experiment grid (``grid``).

Only the config builders are imported here; ``peft_jax.hpo.sweep`` needs optuna (the hpo extra),
a grid with fixed hyper-parameters (``peft_jax.hpo.grid``) does not.
"""
from peft_jax.hpo.grid import benchmark_section, release_dir_overrides
from peft_jax.hpo.space import Dist, parse_spec, run_config, space_for, sweep_section

__all__ = ["Dist", "benchmark_section", "release_dir_overrides", "parse_spec", "run_config", "space_for", "sweep_section"]
