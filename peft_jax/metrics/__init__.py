"""Metrics: classification (`classification`: macro-F1, AUROC, ECE, subgroups) and FID (`fid`, `inception`)."""
from peft_jax.metrics.fid import feature_statistics, fid, frechet_distance, load_statistics, save_statistics

__all__ = ["feature_statistics", "fid", "frechet_distance", "load_statistics", "save_statistics"]
