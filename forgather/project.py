"""Projects and workspaces, and one config taken through the pipeline stages.

A project is a directory with a `meta.yaml`. A workspace is the nearest directory at or above the project
holding a `forgather_workspace/` directory (its templates, e.g. `meta_defaults.yaml`, are shared by every
project below it); without one, the project is its own workspace root.

`meta.yaml` is a template, as in the reference Forgather: it is rendered with the globals `project_dir`
and `workspace_root` (search path: the project directory, the workspace's `forgather_workspace/`, the
user's `~/.config/forgather/templates`), so it may `-- extends "meta_defaults.yaml"`, and the result is
read as YAML. Its keys (all optional):

    name, description   shown by `forgather ls` / `index`
    searchdir           template directories, replacing the default [<project>/templates]
    template_paths      more template directories, searched after searchdir
    config_prefix       the directory under the template directories holding the configs (default configs)
    default_config      the config used when none is chosen (default: the first one, by name)
    system_path         a directory put on sys.path before construction (relative to the project)
    model_src           the directory `.relative:Name` import specs resolve in (default model_src)

The template search path is searchdir, then template_paths, then the `conf/` library, then user paths
(`--template-path`); relative directories are relative to the project. Every meta error (template or YAML
syntax, a key of the wrong type, a missing `meta_defaults.yaml`) is a `TemplateError` naming meta.yaml's
line.

`LoadedConfig` runs template -> YAML -> graph -> config lazily, one stage at a time, and turns every
failure into an error that names the author's file and line: YAML and construction errors are mapped
from the rendered text back to the template line that produced it.

A config may declare its own command-line arguments in a `dynamic_args` target (a list of argparse
`add_argument` keyword sets, with `names`); `add_dynamic_arguments` adds them to a parser and
`dynamic_values` picks the values given, which the CLI passes to the template.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jinja2
import yaml

from forgather.errors import UserError, did_you_mean
from forgather.yaml_file import key_lines
from forgather.template import TemplateEnvironment, TemplateError, TemplateWarning
from forgather.template.errors import SourceLocation
from forgather.template.globals import forgather_config_dir

META_FILE = "meta.yaml"
WORKSPACE_DIR = "forgather_workspace"
CONFIGS_DIR = "configs"
DYNAMIC_ARGS = "dynamic_args"
PP_CONFIG_VAR = "pp_config"

# meta.yaml key -> the type it must have; other keys are kept and not checked.
_META_TYPES: dict[str, type] = {
    "name": str,
    "description": str,
    "searchdir": list,
    "template_paths": list,
    "config_prefix": str,
    "default_config": str,
    "system_path": str,
    "model_src": str,
}


def conf_dir() -> str:
    """The installed templates library (`forgather.conf`)."""
    import forgather.conf

    return os.path.dirname(os.path.abspath(forgather.conf.__file__))


# The reference Forgather's configs describe themselves in their metadata block.
_REFERENCE_DESCRIPTION = re.compile(r"""^\s*--\s*set\s+ns\.config_description\s*=\s*(["'])(.*?)\1\s*$""", re.M)


def config_description(path: str) -> str:
    """A config's description: its first `##` comment line before any content (statements aside), or else
    a `-- set ns.config_description = "..."` line (the reference Forgather's convention)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("##"):
            return stripped.lstrip("#").strip()
        if stripped and not stripped.startswith(("#", "--")):
            break
    found = _REFERENCE_DESCRIPTION.search(text)
    return found.group(2) if found else ""


def _nearest_above(directory: str, holds: str, is_dir: bool) -> str | None:
    """The nearest directory at or above `directory` that holds the directory (is_dir) or file `holds`, or None."""
    directory = os.path.abspath(directory)
    while True:
        if (os.path.isdir if is_dir else os.path.isfile)(os.path.join(directory, holds)):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def find_workspace_root(directory: str) -> str | None:
    """The nearest directory at or above `directory` that holds a `forgather_workspace/` directory."""
    return _nearest_above(directory, WORKSPACE_DIR, is_dir=True)


def enclosing_project(directory: str) -> str | None:
    """The project `directory` is in: the nearest directory at or above it with a meta.yaml (so that commands work
    from inside a project's templates, as in the reference Forgather), or None."""
    return _nearest_above(directory, META_FILE, is_dir=False)


def located_error(templates: TemplateEnvironment, template: str, context: dict[str, Any], message: str,
                  rendered_line: int | None, rendered: str = "rendered text",
                  lines: list[SourceLocation | None] | None = None) -> TemplateError:
    """An error at a line of `template`'s rendered text (`rendered` names that text in the message when no
    template line is found), re-addressed to the template line behind it (`lines`: templates.locate_lines of
    the template, when the caller has them).

    YAML notices a mistake at the token after it (an unclosed `[` or quote at the next line). When that line
    starts another template's text, the mistake is in the text above it, from another file: the error names
    the line above and says where YAML noticed it. The requested template leads the chain unless the line is in
    the file it starts."""
    from forgather.template.environment import nearest_location

    top = templates.origin_of(template)
    if rendered_line and lines is None:
        lines = templates.locate_lines(template, **context)
    found = nearest_location(lines, rendered_line) if lines and rendered_line else None
    if found is None:
        where = f" (line {rendered_line} of the {rendered})" if rendered_line else ""
        return TemplateError(message + where, [top])
    location, exact = found
    if exact and message.startswith("YAML syntax error"):
        above = nearest_location(lines, rendered_line - 1)
        if above is not None and above[0].path != location.path:
            message = f"{message} (YAML noticed it at {location}, where the next template's text starts)"
            location = above[0]
    chain = [location] if location == top or (location.path == top.path and top.line == 1) else [top, location]
    return TemplateError(message if exact else f"{message} (near this line)", chain)


def _yaml_problem(error: yaml.MarkedYAMLError) -> tuple[str, int | None]:
    mark = error.problem_mark or error.context_mark
    problem = " ".join(p for p in (error.context, error.problem) if p)
    return problem, (mark.line + 1 if mark else None)


def read_meta(root: str, workspace_root: str) -> dict[str, Any]:
    """Render `<root>/meta.yaml` and read it (see the module docstring); errors name meta.yaml's line."""
    search = [root]
    for directory in (os.path.join(workspace_root, WORKSPACE_DIR), os.path.join(forgather_config_dir(), "templates")):
        if os.path.isdir(directory) and directory not in search:
            search.append(directory)
    templates = TemplateEnvironment(search)
    context = {"project_dir": root, "workspace_root": workspace_root}
    templates.env.globals.update(context)
    try:
        text = templates.render(META_FILE, **context)
    except TemplateError as error:
        if error.chain and not os.path.isabs(error.location.path):  # it failed before the file was read
            error.chain[-1] = SourceLocation(os.path.join(root, META_FILE), error.location.line)
        if isinstance(error.__cause__, jinja2.TemplateNotFound) and len(search) == 1:
            error.message += (f"; no {WORKSPACE_DIR}/ directory was found at or above {root}: the workspace's "
                              f"meta templates (meta_defaults.yaml) live in <workspace root>/{WORKSPACE_DIR}/")
        raise
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        meta = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        problem, line = _yaml_problem(error)
        raise located_error(templates, META_FILE, context, f"meta.yaml is not valid YAML: {problem}", line) from error
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TemplateError(f"meta.yaml must be a mapping (name: ..., description: ...), not a {type(meta).__name__}", [templates.origin_of(META_FILE)])
    lines = key_lines(document)
    for key, expected in _META_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if expected is str and isinstance(value, (int, float)) and key in ("name", "description"):
            meta[key] = str(value)
            continue
        if not isinstance(value, expected) or (expected is list and not all(isinstance(v, str) for v in value)):
            wanted = "a list of directories" if expected is list else "a string"
            message = f"meta.yaml: {key} must be {wanted}, not {value!r}"
            raise located_error(templates, META_FILE, context, message, lines.get(key))
    for key in meta:  # a misspelling of a key we read; other keys (the reference's `models_dir`) are kept quietly
        unknown = isinstance(key, str) and key not in _META_TYPES
        close = did_you_mean(key, [k for k in _META_TYPES if k not in meta], cutoff=0.8) if unknown else ""
        if close:
            mistake = located_error(templates, META_FILE, context, f"meta.yaml: unknown key {key!r}, not read; {close}",
                                    lines.get(key))
            if templates.strict:
                raise mistake
            warnings.warn_explicit(mistake.message, TemplateWarning, mistake.location.path, mistake.location.line)
    return meta


@dataclass
class Project:
    root: str
    meta: dict[str, Any] = field(default_factory=dict)
    workspace_root: str | None = None  # None: no workspace above the project; it is its own root

    @classmethod
    def load(cls, root: str = ".") -> "Project":
        root = os.path.abspath(root)
        if not os.path.isfile(os.path.join(root, META_FILE)):
            raise FileNotFoundError(f"{root} is not a Forgather project: it has no {META_FILE}")
        workspace = find_workspace_root(root)
        return cls(root, read_meta(root, workspace or root), workspace)

    @classmethod
    def find(cls, directory: str = ".") -> "Project":
        """The project `directory` is in (`enclosing_project`); none is the error of loading `directory` itself."""
        return cls.load(enclosing_project(directory) or os.path.abspath(directory))

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or os.path.basename(self.root))

    @property
    def description(self) -> str:
        return str(self.meta.get("description") or "")

    def _path(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.root, path))

    def globals(self) -> dict[str, Any]:
        """The template globals of this project."""
        return {"project_dir": self.root, "workspace_root": self.workspace_root or self.root}

    @property
    def template_dirs(self) -> list[str]:
        """The project's own template directories: searchdir (or templates/), then template_paths."""
        searchdir = self.meta.get("searchdir") or ["templates"]
        return [self._path(p) for p in [*searchdir, *self.meta.get("template_paths", [])]]

    @property
    def templates_dir(self) -> str:
        return self.template_dirs[0]

    @property
    def config_prefix(self) -> str:
        return str(self.meta.get("config_prefix") or CONFIGS_DIR).strip("/")

    @property
    def model_src(self) -> str:
        return self._path(self.meta.get("model_src", "model_src"))

    @property
    def system_path(self) -> str | None:
        path = self.meta.get("system_path")
        return self._path(path) if path else None

    def search_path(self, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        return [*self.template_dirs, conf_dir(), *[os.path.abspath(p) for p in extra]]

    def configs(self) -> list[str]:
        """Config names (relative to `<template dir>/<config_prefix>`, in every template dir), sorted."""
        found = set()
        for templates in self.template_dirs:
            directory = os.path.join(templates, self.config_prefix)
            for parent, dirs, files in os.walk(directory, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if name.endswith((".yaml", ".yml")):
                        found.add(os.path.relpath(os.path.join(parent, name), directory))
        return sorted(found)

    def config_file(self, config: str) -> str | None:
        """The file of a config (a name from `configs()`), from the first template dir that has it."""
        for templates in self.template_dirs:
            path = os.path.join(templates, self.config_prefix, config)
            if os.path.isfile(path):
                return path
        return None

    @property
    def default_config(self) -> str | None:
        configs = self.configs()
        return self.meta.get("default_config") or (configs[0] if configs else None)

    def config_template(self, config: str | None, template_paths: tuple[str, ...] = ()) -> str:
        """The template name of a config given as 'name', 'name.yaml' or '<config_prefix>/name.yaml', or as the
        path of its file (absolute, or from the current directory, as a shell completes it) when that file lies
        in one of the project's template directories."""
        config = config or self.default_config
        if not config:
            raise ValueError(f"project {self.name!r} has no configs under {self.config_prefix}/ in {', '.join(self.template_dirs)}")
        name = config if config.endswith((".yaml", ".yml")) else f"{config}.yaml"
        name = name if name.startswith(f"{self.config_prefix}/") else f"{self.config_prefix}/{name}"
        if any(os.path.isfile(os.path.join(directory, name)) for directory in self.template_dirs):
            return name  # a config's name wins over a file of that name in the current directory
        template = self._template_of_file(config, template_paths)
        if template is None and os.path.isabs(config) and os.path.isfile(config):  # no config name: a file
            raise ValueError(f"-t {config}: this file lies outside the project's template directories "
                             f"({', '.join([*self.template_dirs, *template_paths])}); copy it into "
                             f"{self.config_prefix}/ of one of them, or add the directory it is a template of "
                             f"with --template-path DIR")
        return template or name

    def _template_of_file(self, path: str, template_paths: tuple[str, ...] = ()) -> str | None:
        """The template name of the file at `path`, relative to the template directory holding it; None when
        there is no such file or it lies outside the project's template directories."""
        if not os.path.isfile(path):
            return None
        found = os.path.realpath(path)
        for directory in [*self.template_dirs, *template_paths]:
            inside = os.path.relpath(found, os.path.realpath(directory))
            if not inside.startswith(os.pardir + os.sep) and inside != os.pardir:
                return inside.replace(os.sep, "/")
        return None

    def load_config(self, config: str | None, template_paths: tuple[str, ...] = (), **context: Any) -> "LoadedConfig":
        templates = TemplateEnvironment(self.search_path(template_paths))
        return LoadedConfig(self, self.config_template(config, tuple(template_paths)), templates, context)


def project_dirs(root: str, recursive: bool) -> list[str]:
    """Directories holding a meta.yaml at `root` (and below it, with `recursive`), in walk order."""
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in ("templates", "output_models", WORKSPACE_DIR))
        if META_FILE in files:
            found.append(os.path.abspath(parent))
            # a project's runs (its outputs/ and multirun/, where `--outputs` defaults) hold no projects, only
            # snapshots with meta.yaml files of their own, and can be many
            dirs[:] = [d for d in dirs if d not in ("outputs", "multirun")]
        if not recursive:
            break
    return found


def find_projects(root: str, recursive: bool) -> list[Project]:
    """The projects of `project_dirs` whose meta.yaml loads."""
    projects = []
    for directory in project_dirs(root, recursive):
        try:
            projects.append(Project.load(directory))
        except TemplateError:
            continue
    return projects


# A line of one bracketed word that the line syntax did not take for a block header (`[a-b]`, `[]`, `[mo del]`).
_NEAR_HEADER = re.compile(r"\s*(\[[^\[\]{},:'\"#]*\])\s*")


def _bad_block_header(text: str, error: Any) -> tuple[int, str] | None:
    """The rendered line, and its text, of a would-be block header that a YAML syntax error comes from: YAML
    reads `[a-b]` as a flow list and fails at the line after it. Only a failing YAML is asked, so a list
    written on purpose (`[1]`, a document `[]`) is never taken for a header."""
    if not error.describe(str).startswith("YAML syntax error") or not error.line:
        return None
    lines = text.split("\n")
    for line in (error.line - 1, error.line):
        found = _NEAR_HEADER.fullmatch(lines[line - 1]) if 0 < line <= len(lines) else None
        if found:
            return line, found.group(1)
    return None


@dataclass
class LoadedConfig:
    """One config of a project, taken through the stages on demand; errors name template lines."""

    project: Project
    template: str
    templates: TemplateEnvironment
    context: dict[str, Any]

    def __post_init__(self) -> None:
        # Globals, not only render context: templates imported without context see them too.
        self.templates.env.globals.update(self.project.globals())

    @cached_property
    def text(self) -> str:
        """Stage 1: the rendered YAML."""
        return self.templates.render(self.template, **self._template_context())

    def _template_context(self) -> dict[str, Any]:
        base = {**self.project.globals(), "model_src_dir": self.project.model_src}
        return {**base, **self.context}

    def located(self, message: str, rendered_line: int | None) -> TemplateError:
        """An error at a line of the rendered YAML, re-addressed to the template line behind it (located_error)."""
        return located_error(self.templates, self.template, self._template_context(), message, rendered_line,
                             "rendered YAML; see `forgather pp`", self._source_lines if rendered_line else None)

    @cached_property
    def _source_lines(self) -> list[SourceLocation | None] | None:
        """The template line behind each rendered line, found once (two renders) for all of the config's
        warnings and errors: a reference project's config may have a dozen duplicate keys to place."""
        return self.templates.locate_lines(self.template, **self._template_context())

    @cached_property
    def graph(self):
        """Stage 2: the node graph."""
        from forgather.graph import GraphError, load_graph

        def place(line: int) -> str:
            return str(self.located("", line).location)

        def duplicate(error: GraphError) -> None:
            """A key repeated in one mapping. Written again by another template (one that extends or includes
            the first one's), it is an override, as the reference Forgather's templates use it (`== super()`
            and then the keys that change): YAML keeps the last. Repeated within one template, it is likely a
            mistake: a warning at the template line (strict mode: an error)."""
            location = self.located("", error.line).location
            if error.other_line is not None and self.located("", error.other_line).location.path != location.path:
                return
            if self.templates.strict:
                raise self.located(error.describe(place), error.line)
            warnings.warn_explicit(error.describe(place), TemplateWarning, location.path, location.line)

        try:
            return load_graph(self.text, strict=False, warn=duplicate)
        except GraphError as error:
            header = _bad_block_header(self.text, error)
            if header is not None:
                line, text = header
                raise self.located(f"{text} is not a block header: a block name is letters, digits and _ "
                                   f"([name], or [name!] to trim it); YAML read the line as a list", line) from error
            raise self.located(error.describe(place), error.line) from error

    @cached_property
    def _config_result(self):
        from omegaconf import OmegaConf

        from forgather.graph import GraphError, to_config
        from forgather.graph.config import escape

        try:
            result = to_config(self.graph, file_root=self.project.root)
        except GraphError as error:
            raise self.located(error.message, error.line) from error
        # As in the reference Forgather, a `!var "pp_config"` without a value is the rendered YAML.
        # (`in` is False for a key whose value is missing: ask the keys.)
        if PP_CONFIG_VAR in result.config.keys() and OmegaConf.is_missing(result.config, PP_CONFIG_VAR):
            result.config[PP_CONFIG_VAR] = escape(self.text)
        return result

    @property
    def config(self):
        """Stage 3: the OmegaConf config."""
        return self._config_result.config

    def construct(self, target: str | list[str] | None = None, config=None) -> Any:
        """Stage 4: objects (one target, a dict of a list of them, or every one: the graph's targets, not the
        `!var` settings). `config` may be an edited copy of `self.config` (overrides)."""
        from forgather.graph import ConstructError, construct

        system_path = self.project.system_path
        if system_path and system_path not in sys.path:
            sys.path.insert(0, system_path)
        _CONSTRUCTING.append(_construction_key(self, target))
        try:
            config = self.config if config is None else config
            names = target if target is not None else self._targets_in(config)
            return construct(config, names, base_dir=self.project.model_src)
        except ConstructError as error:
            line = self.line_of(error.path)
            raise self.located(f"constructing {error.path}: {error.message}", line) from error
        finally:
            _CONSTRUCTING.pop()

    def _targets_in(self, config) -> list[str]:
        """Every target: the graph's that `config` holds (a run's leaves out `hydra:`), not the !var settings."""
        return [name for name in self.graph.targets if name in config and not str(name).startswith("_")]

    def line_of(self, path: str) -> int | None:
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
        config = self.config if config is None else config
        return generate_code(config, target, base_dir=self.project.model_src, title=title, targets=self._targets_in(config))


# -- from_project: one config's objects inside another's -------------------------------------------------

class TargetDict(dict):
    """The targets `from_project` built, by name; also as attributes (`models.model`), as in the reference."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no target {name!r} was built; built: {', '.join(self) or 'none'}") from None


def variable_names(graph: Any) -> set[str]:
    """The names of the graph's `!var` nodes: the values a caller may set (on the command line, or here)."""
    from forgather.graph.nodes import VarNode, walk

    return {value.name for value in walk(*graph.nodes.values()) if isinstance(value, VarNode)}


def from_project(project_dir: str, config_template: str | None = None, targets: str | list[str] = "",
                 pp_debug: bool = False, pp_kwargs: dict[str, Any] | None = None, **variables: Any) -> Any:
    """Build targets of a config of another project, as the reference Forgather's `forgather:from_project`,
    which its templates call to take a model, tokenizer or datasets from a sibling project:

        .define: &models !call:forgather:from_project
            project_dir: "{{ joinpath(project_dir, '../model') }}"
            config_template: "4M.yaml"          # the project's default config when empty
            targets: [ "pretrained_tokenizer", "model" ]
            pp_kwargs: { seq_len: 512 }         # template variables for rendering that config
            tokenizer: *tokenizer               # any other keyword: the value of its `!var tokenizer`

    `targets` a name gives that object ("" gives `main`); a list gives a TargetDict of them, built together
    (a node they share is one object). Keywords set the config's `!var`s: an object arrives as it is, but a
    value OmegaConf reads as data (a mapping, list, tuple or dataclass) arrives as a copy of its data; as
    in the reference, a keyword the config has no `!var` for is ignored (a caller passes the same set to
    several projects), unless its name is close to one the config has: that is a warning, as a likely typo.
    Errors name the other project's template lines, like this project's own.
    """
    from omegaconf import OmegaConf

    project = Project.load(os.path.abspath(project_dir))
    loaded = project.load_config(config_template or None, **(pp_kwargs or {}))
    _FROM_PROJECT_TRACKER.saw(loaded)
    here = _construction_key(loaded, (targets or "main") if isinstance(targets, str) else list(targets))
    if here in _CONSTRUCTING:  # else a RecursionError, deep inside construction
        chain = " -> ".join([*_CONSTRUCTING[_CONSTRUCTING.index(here):], here])
        raise UserError(f"from_project cycle: {chain}; building these targets needs themselves")
    if pp_debug:
        print(f"from_project {project.root}:{loaded.template} targets={targets!r}\n{loaded.text}")
    declared = variable_names(loaded.graph)
    config = OmegaConf.create(loaded.config, flags={"allow_objects": True})
    for name, value in variables.items():
        if name in declared:
            config[name] = _literal(value)
        elif hint := did_you_mean(name, sorted(declared)):
            warnings.warn(f"from_project({project_dir!r}): {loaded.template} has no !var {name!r}, so it is ignored; {hint}",
                          TemplateWarning, stacklevel=2)
    if isinstance(targets, str):
        return loaded.construct(targets or "main", config=config)
    return TargetDict(loaded.construct(list(targets), config=config))


def _literal(value: Any) -> Any:
    """A value given from outside, for the config: text stays text (a "${" in it is no interpolation)."""
    from forgather.graph.config import escape

    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(item) for item in value]
    return value


class _FromProjectTracker:
    """What a run built through from_project, for its snapshot; and, when a run is built again from its snapshot,
    the check that each of those configs is still the one it recorded.

    A snapshot records the run's own config whole, but a from_project call in it renders the other project's
    templates again, from wherever they are now: a changed sibling would rebuild something else under the name of
    the same run. So each config from_project renders is recorded (its key, as in `_construction_key`, with a
    sha256 of its YAML before the caller's variables) with its template files, and a replay refuses a config whose
    YAML changed. Active inside `tracking_from_project` only; elsewhere from_project records nothing."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] | None = None
        self.expected: dict[str, str] = {}

    def saw(self, loaded: LoadedConfig) -> None:
        if self.records is None:
            return
        from omegaconf import OmegaConf

        key = _config_key(loaded)
        digest = hashlib.sha256(OmegaConf.to_yaml(loaded.config).encode()).hexdigest()
        if key in self.expected and self.expected[key] != digest:
            raise UserError(
                f"from_project {key}: this config of the other project renders other YAML than when the run was "
                f"recorded (snapshot/meta.yaml, from_project); the run's snapshot keeps its templates as they were, "
                f"under sources/from_project/: put them back in the other project, or start a new run of the experiment")
        if all(record["config"] != key for record in self.records):
            self.records.append({"config": key, "sha256": digest, "files": loaded.templates.source_files(),
                                 "root": loaded.project.root, "name": loaded.project.name})


_FROM_PROJECT_TRACKER = _FromProjectTracker()


@contextlib.contextmanager
def tracking_from_project(expected: list[dict[str, Any]] | None = None):
    """Record what from_project builds inside the block (yields the list of records: config, sha256, and the
    template files it rendered); with `expected` (a snapshot's records), a recorded config that now renders to
    other YAML is an error. Not reentrant: the runner holds it around one construction."""
    tracker = _FROM_PROJECT_TRACKER
    tracker.records, tracker.expected = [], {record["config"]: record["sha256"] for record in expected or []}
    try:
        yield tracker.records
    finally:
        tracker.records, tracker.expected = None, {}


def from_project_snapshot(records: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """A run snapshot's share of from_project's records: (for meta.yaml, each config and sha256; for sources/,
    each template file under from_project/<n>_<project name>/, relative to its project or by name)."""
    meta, files = [], {}
    for index, record in enumerate(records):
        meta.append({"config": record["config"], "sha256": record["sha256"]})
        base = f"from_project/{index}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(record['name']))}"
        for path in record["files"]:
            inside = os.path.relpath(path, record["root"])
            files[f"{base}/{inside if not inside.startswith('..') else os.path.basename(path)}"] = path
    return meta, files


# What is being constructed, outermost first (construction is single-threaded): a from_project asking for
# the same targets of the same config again is a cycle. (Another target of the same config is not.)
_CONSTRUCTING: list[str] = []


def _construction_key(loaded: LoadedConfig, target: str | list[str] | None) -> str:
    """Which targets of which config: rendered with other template variables (pp_kwargs: a student built from
    its teacher's config) it is another config."""
    names = "every target" if target is None else ",".join([target] if isinstance(target, str) else target)
    return f"{_config_key(loaded)}[{names}]"


def _config_key(loaded: LoadedConfig) -> str:
    context = f" with {sorted(loaded.context.items())!r}" if loaded.context else ""
    return f"{loaded.project.root}:{loaded.template}{context}"


# -- dynamic_args: command-line arguments a config declares ------------------------------------------------

def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


# The `type:` names a declaration may use (YAML cannot name a Python callable).
_ARGUMENT_TYPES = {"int": int, "str": str, "float": float, "bool": _boolean, "path": os.path.expanduser}


def dynamic_arguments(loaded: LoadedConfig) -> list[dict[str, Any]]:
    """The declarations of a config's `dynamic_args` target (none when it has no such target)."""
    if DYNAMIC_ARGS not in loaded.graph.targets:
        return []
    declared = loaded.construct(DYNAMIC_ARGS)
    if isinstance(declared, dict):
        declared = list(declared.values())
    line = loaded.line_of(DYNAMIC_ARGS)
    if not isinstance(declared, (list, tuple)) or not all(isinstance(d, dict) and d.get("names") for d in declared):
        raise loaded.located(f"{DYNAMIC_ARGS} must be a list (or !dlist) of argument declarations, each with names: '--flag'", line)
    return [dict(d) for d in declared]


def add_dynamic_arguments(parser: argparse.ArgumentParser, loaded: LoadedConfig) -> list[str]:
    """Add a config's declared arguments to `parser`; returns their destinations.

    As in the reference Forgather, a declared `default` is dropped: an argument not given is not passed, so
    the template's own default applies (a `store_true` flag not given passes False)."""
    group = parser.add_argument_group(f"arguments of {loaded.template} ({DYNAMIC_ARGS})")
    dests = []
    for declaration in dynamic_arguments(loaded):
        names = declaration.pop("names")
        names = [names] if isinstance(names, str) else list(names)
        declaration.pop("default", None)
        kind = declaration.get("type")
        if isinstance(kind, str):
            if kind not in _ARGUMENT_TYPES:
                raise loaded.located(f"{DYNAMIC_ARGS} {names[0]}: unknown type {kind!r}; use one of {', '.join(_ARGUMENT_TYPES)}", loaded.line_of(DYNAMIC_ARGS))
            declaration["type"] = _ARGUMENT_TYPES[kind]
        try:
            dests.append(group.add_argument(*names, **declaration).dest)
        except (argparse.ArgumentError, TypeError, ValueError) as error:
            raise loaded.located(f"{DYNAMIC_ARGS} {names[0]}: {error}", loaded.line_of(DYNAMIC_ARGS)) from error
    return dests


def dynamic_values(args: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    """The declared arguments the command line gave (None means not given, and is left out)."""
    return {dest: getattr(args, dest) for dest in dests if getattr(args, dest, None) is not None}
