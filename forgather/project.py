"""Projects, and one config taken through the pipeline stages.

A project is a directory with a `meta.yaml` (name, description, optional `template_paths`, `model_src`,
`default_config`), a `templates/` directory (its `project.yaml` is the project's base template) and
`templates/configs/*.yaml` (the configs a user runs). The template search path is: the project's
`templates/`, the paths listed in meta.yaml, the `conf/` library, then user paths (`--template-path`).

`LoadedConfig` runs template -> YAML -> graph -> config lazily, one stage at a time, and turns every
failure into an error that names the author's file and line: YAML and construction errors are mapped
from the rendered text back to the template line that produced it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from forgather.template import TemplateEnvironment, TemplateError

META_FILE = "meta.yaml"
CONFIGS_DIR = "configs"


def conf_dir() -> str:
    """The installed templates library (`forgather.conf`)."""
    import forgather.conf

    return os.path.dirname(os.path.abspath(forgather.conf.__file__))


def first_comment(path: str) -> str:
    """A template's description: the text of its first `##` comment line."""
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                stripped = line.strip()
                if stripped.startswith("##"):
                    return stripped.lstrip("#").strip()
                if stripped and not stripped.startswith("#"):
                    break
    except OSError:
        pass
    return ""


@dataclass
class Project:
    root: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str = ".") -> "Project":
        root = os.path.abspath(root)
        meta_path = os.path.join(root, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{root} is not a Forgather project: it has no {META_FILE}")
        with open(meta_path, encoding="utf-8") as file:
            meta = yaml.safe_load(file) or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: must be a mapping (name: ..., description: ...)")
        return cls(root, meta)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", os.path.basename(self.root)))

    @property
    def description(self) -> str:
        return str(self.meta.get("description", ""))

    @property
    def templates_dir(self) -> str:
        return os.path.join(self.root, "templates")

    @property
    def model_src(self) -> str:
        return os.path.join(self.root, self.meta.get("model_src", "model_src"))

    def search_path(self, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        listed = [os.path.join(self.root, p) for p in self.meta.get("template_paths", [])]
        return [self.templates_dir, *listed, conf_dir(), *[os.path.abspath(p) for p in extra]]

    def configs(self) -> list[str]:
        """Config names (relative to templates/configs), sorted."""
        directory = os.path.join(self.templates_dir, CONFIGS_DIR)
        found = []
        for parent, _, files in os.walk(directory):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    found.append(os.path.relpath(os.path.join(parent, name), directory))
        return sorted(found)

    def config_template(self, config: str | None) -> str:
        """The template name of a config given as 'name', 'name.yaml' or 'configs/name.yaml'."""
        config = config or self.meta.get("default_config")
        if not config:
            raise ValueError(f"project {self.name!r}: choose a config with -t; it has: {', '.join(self.configs())}")
        name = config if config.endswith((".yaml", ".yml")) else f"{config}.yaml"
        return name if name.startswith(f"{CONFIGS_DIR}/") else f"{CONFIGS_DIR}/{name}"

    def load_config(self, config: str | None, template_paths: tuple[str, ...] = (), **context: Any) -> "LoadedConfig":
        templates = TemplateEnvironment(self.search_path(template_paths))
        return LoadedConfig(self, self.config_template(config), templates, context)


def find_projects(root: str, recursive: bool) -> list[Project]:
    """Projects at `root` (and below it, with `recursive`)."""
    projects = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("templates", "output_models"))
        if META_FILE in files:
            try:
                projects.append(Project.load(parent))
            except (ValueError, yaml.YAMLError):
                continue
        if not recursive:
            break
    return projects


@dataclass
class LoadedConfig:
    """One config of a project, taken through the stages on demand; errors name template lines."""

    project: Project
    template: str
    templates: TemplateEnvironment
    context: dict[str, Any]

    @cached_property
    def text(self) -> str:
        """Stage 1: the rendered YAML."""
        return self.templates.render(self.template, **self._template_context())

    def _template_context(self) -> dict[str, Any]:
        base = {"project_dir": self.project.root, "model_src_dir": self.project.model_src}
        return {**base, **self.context}

    def located(self, message: str, rendered_line: int | None) -> TemplateError:
        """An error at a line of the rendered YAML, re-addressed to the template line behind it.

        YAML notices a mistake at the token after it (an unclosed `[` or quote at the next line). When that
        line starts another template's text, the mistake is in the text above it, from another file: the
        error names the line above and says where YAML noticed it."""
        from forgather.template.environment import nearest_location

        top = self.templates.origin_of(self.template)
        lines = self.templates.locate_lines(self.template, **self._template_context()) if rendered_line else None
        found = nearest_location(lines, rendered_line) if lines and rendered_line else None
        if found is None:
            where = f" (line {rendered_line} of the rendered YAML; see `forgather pp`)" if rendered_line else ""
            return TemplateError(message + where, [top])
        location, exact = found
        if exact and message.startswith("YAML syntax error"):
            above = nearest_location(lines, rendered_line - 1)
            if above is not None and above[0].path != location.path:
                message = f"{message} (YAML noticed it at {location}, where the next template's text starts)"
                location = above[0]
        chain = [location] if location == top else [top, location]
        return TemplateError(message if exact else f"{message} (near this line)", chain)

    @cached_property
    def graph(self):
        """Stage 2: the node graph."""
        from forgather.graph import GraphError, load_graph

        try:
            return load_graph(self.text)
        except GraphError as error:
            message = error.describe(lambda line: str(self.located("", line).location))
            raise self.located(message, error.line) from error

    @cached_property
    def _config_result(self):
        from forgather.graph import to_config

        return to_config(self.graph)

    @property
    def config(self):
        """Stage 3: the OmegaConf config."""
        return self._config_result.config

    def construct(self, target: str | None = None, config=None) -> Any:
        """Stage 4: objects. `config` may be an edited copy of `self.config` (overrides)."""
        from forgather.graph import ConstructError, construct

        try:
            return construct(self.config if config is None else config, target, base_dir=self.project.model_src)
        except ConstructError as error:
            line = self._line_of(error.path)
            raise self.located(f"constructing {error.path}: {error.message}", line) from error

    def _line_of(self, path: str) -> int | None:
        """Rendered-YAML line of the node at `path` or, failing that, of its nearest ancestor."""
        lines = self._config_result.lines
        while path:
            if path in lines:
                return lines[path]
            path = path.rpartition(".")[0]
        return None

    def code(self, target: str | None = None, config=None) -> str:
        """Stage 5: Python source building `target`. `config` may be an edited copy of `self.config`."""
        from forgather.graph import generate_code

        title = f"Generated by Forgather from {self.template} ({self.project.name}): construct() builds {target or 'every target'}."
        return generate_code(self.config if config is None else config, target, base_dir=self.project.model_src, title=title)
