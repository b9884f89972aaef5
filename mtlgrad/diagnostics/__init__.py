"""Diagnostics of the task gradients: running statistics of the step records, logged to
TensorBoard or CSV, and a cosine heat map."""

from mtlgrad.diagnostics._monitor import GradientMonitor

__all__ = ["GradientMonitor"]
