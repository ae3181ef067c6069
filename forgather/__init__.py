"""Forgather: templates -> YAML -> node graph -> OmegaConf -> Python objects."""

__version__ = "0.1.0"

from forgather.lazy import lazy_exports

# The reference Forgather's templates call `!call:forgather:from_project`; loaded on first use.
__getattr__ = lazy_exports(__name__, {"from_project": "project", "Project": "project"})
