"""A drop-in ``torch.optim`` wrapper that aggregates the task gradients before each step."""

from mtlgrad.optim._mtl_optimizer import MTLOptimizer

__all__ = ["MTLOptimizer"]
