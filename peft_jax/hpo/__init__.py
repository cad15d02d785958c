"""Hyper-parameter search (ASHA over Optuna studies) and the benchmark grid behind the paper's tables."""
from peft_jax.hpo.benchmark import benchmark_section, run_benchmark
from peft_jax.hpo.space import Dist, parse_spec, run_config, space_for, with_values
from peft_jax.hpo.sweep import check_space, open_study, run_sweep, summarize, sweep_section, trial_config

__all__ = ["Dist", "benchmark_section", "check_space", "open_study", "parse_spec", "run_benchmark", "run_config",
           "run_sweep", "space_for", "summarize", "sweep_section", "trial_config", "with_values"]
