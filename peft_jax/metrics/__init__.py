"""Generative-model metrics."""
from peft_jax.metrics.fid import feature_statistics, fid, frechet_distance

__all__ = ["feature_statistics", "fid", "frechet_distance"]
