"""Random-weight PyTorch reference models for the parity tests of the weight converters."""
import numpy as np
import torch


def randomize(model: torch.nn.Module, std: float, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms around 1 and random BatchNorm statistics, so that a swapped or
    skipped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)
