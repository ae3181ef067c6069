"""Forgather: templates -> YAML -> node graph -> OmegaConf -> Python objects."""

__version__ = "0.1.0"
