"""Integrations with training frameworks, each an optional module imported on its own.

- :mod:`mtlgrad.integrations.lightning`: PyTorch Lightning (manual optimisation), needs the
  ``lightning`` package.
- :mod:`mtlgrad.integrations.huggingface`: the Hugging Face ``Trainer`` (``MTLTrainer``), needs
  ``transformers`` and ``accelerate``.

Each submodule imports its framework when it is itself imported; ``import mtlgrad`` imports none
of them, and none of the frameworks.
"""
