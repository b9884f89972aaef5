"""Optional integrations with training frameworks.

Each submodule imports its framework when it is itself imported (``import
mtlgrad.integrations.huggingface`` needs ``transformers``); ``import mtlgrad`` never does.
"""
