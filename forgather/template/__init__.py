"""Template stage: Jinja2 with Forgather's line syntax, split files, and errors in the author's lines."""

from forgather.template.environment import TemplateEnvironment
from forgather.template.errors import SourceLocation, TemplateError, TemplateWarning

__all__ = ["TemplateEnvironment", "TemplateError", "TemplateWarning", "SourceLocation"]
