"""Integrations with training frameworks, each an optional module imported on its own.

- :mod:`mtlgrad.integrations.lightning`: PyTorch Lightning (manual optimisation), needs the
  ``lightning`` package.

``import mtlgrad`` imports none of them, and none of the frameworks.
"""
