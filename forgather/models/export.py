"""Standalone model export: write a configured model as a Hugging Face remote-code package.

`save_model(model, model_config, out_dir, name)` writes, conventionally under `<project>/output_models/<name>/`:
    modeling_<name>.py       the source of every module the config's targets use (forgather.models components
                             and project-local files), with their intra-package imports stripped, the tree
                             builder, and a transformers PreTrainedModel + GenerationMixin wrapper;
                             it imports torch (and transformers, for the wrapper only) -- never forgather
    configuration_<name>.py  a PretrainedConfig subclass holding the config tree
    config.json              the tree (targets rewritten to the inlined names) and `auto_map`
    model.safetensors        the weights (a tied head is stored once: it has no parameter of its own)
`transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` loads it;
`load_model(out_dir)` returns the plain nn.Module without transformers.

`model_config` is the model's config tree in Forgather's vocabulary (`_target_`, `_args_`, `_partial_`,
`_factory_`, `_id_`), a dict or an OmegaConf DictConfig; `base_dir` anchors `.relative:Name` targets.
Inlined modules share one namespace in the generated file; a top-level name two modules both define is
renamed `<name>_<module>` in the later one, so a project-local `PostLNLayer` can stand beside ours.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import io
import json
import os
import re
import string
import sys
import tokenize
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from forgather.graph.imports import import_spec

from .builder import instantiate

MODELS_DIR = Path(__file__).resolve().parent
FORGATHER_DIR = MODELS_DIR.parent
# Always inlined: the generated entry points use the builder, and the HF wrapper makes the KV cache.
ALWAYS_INLINED = (MODELS_DIR / "kv_cache.py", MODELS_DIR / "builder.py")


class ExportError(ValueError):
    """A config or module that cannot become standalone code; the message names the file and what to change."""


def plain_tree(model_config: Any) -> dict:
    """The config tree as plain dicts and lists, interpolations resolved."""
    if type(model_config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(model_config, resolve=True)
    return copy.deepcopy(model_config)


def build_model(model_config: Any, base_dir: str | None = None) -> nn.Module:
    """Construct the tree in-framework (targets resolved with import_spec): the model save_model expects."""
    return instantiate(plain_tree(model_config), lambda spec: import_spec(spec, base_dir))


def _targets(node: Any) -> Iterator[dict]:
    """Every dict of the tree that has a `_target_`."""
    if isinstance(node, list):
        for item in node:
            yield from _targets(item)
    elif isinstance(node, dict):
        if "_target_" in node:
            yield node
        for value in node.values():
            yield from _targets(value)


def _source_path(obj: Any) -> Path | None:
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    return Path(path).resolve() if path else None


def _is_inlined(obj: Any, base_dir: str | None) -> bool:
    """Forgather components and project-local code are inlined; anything else (torch ...) is imported."""
    path, module = _source_path(obj), getattr(obj, "__module__", "")
    if module.startswith("forgather_local.") or (path and base_dir and path.is_relative_to(Path(base_dir).resolve())):
        return True
    if path and path.is_relative_to(FORGATHER_DIR):
        if not path.is_relative_to(MODELS_DIR):
            raise ExportError(f"{module}:{obj.__qualname__} is Forgather code outside forgather.models; "
                              "standalone model code can only inline forgather.models components")
        return True
    return False


# --- reading one module ----------------------------------------------------------------------------------


@dataclass
class _Module:
    """One inlined source file: what it defines, which inlined files it imports from, and what to strip."""

    path: Path
    source: str
    syntax: ast.Module
    deps: list[Path] = field(default_factory=list)
    imported: dict[str, tuple[Path, str]] = field(default_factory=dict)  # local name -> (file, name there)
    bindings: dict[str, tuple] = field(default_factory=dict)  # top-level name -> what it is bound to
    strip: set[int] = field(default_factory=set)  # 1-based lines to drop
    docstring: str | None = None


def _inlined_import_file(path: Path, node: ast.ImportFrom, local: bool) -> Path | None:
    """The inlined file a `from X import ...` refers to, or None when it is an ordinary (kept) import."""
    module = node.module or ""
    if node.level:
        if node.level > 1 or not module:
            raise ExportError(f"{path}:{node.lineno}: write 'from .module import Name' (one dot, a module name)")
        return path.parent / (module.replace(".", "/") + ".py")
    if module.startswith("forgather.models."):
        return MODELS_DIR / (module.removeprefix("forgather.models.").replace(".", "/") + ".py")
    if _is_forgather(module):
        raise ExportError(f"{path}:{node.lineno}: standalone code cannot import {module!r}; "
                          "import components from their forgather.models.<module> file")
    sibling = path.parent / (module.replace(".", "/") + ".py")
    return sibling if local and sibling.is_file() else None


def _read_module(path: Path, local: bool) -> _Module:
    source = path.read_text()
    syntax = ast.parse(source, str(path))
    found = _Module(path, source, syntax)
    body = syntax.body
    docstring = ast.get_docstring(syntax, clean=False)
    if docstring is not None:
        found.docstring = docstring
        found.strip.update(range(body[0].lineno, body[0].end_lineno + 1))
    for node in body:
        _read_statement(found, node, local)
    for node in _forgather_imports(syntax):
        if node not in body:
            raise ExportError(f"{path}:{node.lineno}: move the forgather import to the top level of the module")
    return found


def _is_forgather(module: str) -> bool:
    return module == "forgather" or module.startswith("forgather.")


def _forgather_imports(syntax: ast.Module) -> Iterator[ast.stmt]:
    """Every import statement, at any depth, that names a forgather module."""
    for node in ast.walk(syntax):
        modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        modules += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(_is_forgather(module) for module in modules):
            yield node


def _read_statement(found: _Module, node: ast.stmt, local: bool) -> None:
    path = found.path
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        found.strip.update(range(node.lineno, node.end_lineno + 1))
    elif isinstance(node, ast.ImportFrom):
        source_file = _inlined_import_file(path, node, local)
        if source_file is None:
            for alias in node.names:
                found.bindings[alias.asname or alias.name] = ("import", node.module, alias.name)
            return
        if not source_file.is_file():
            raise ExportError(f"{path}:{node.lineno}: no file {source_file} to inline")
        found.deps.append(source_file.resolve())
        found.strip.update(range(node.lineno, node.end_lineno + 1))
        for alias in node.names:
            if alias.name == "*":
                raise ExportError(f"{path}:{node.lineno}: name what you import instead of '*'")
            found.imported[alias.asname or alias.name] = (source_file.resolve(), alias.name)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if _is_forgather(alias.name):
                raise ExportError(f"{path}:{node.lineno}: write 'from forgather.models.<module> import Name'")
            bound = alias.asname or alias.name.split(".")[0]
            found.bindings[bound] = ("import", alias.name if alias.asname else bound)
    elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        found.bindings[node.name] = ("def", path, node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    found.bindings[name.id] = ("def", path, name.id)


def _closure(roots: list[Path]) -> list[_Module]:
    """The modules to inline, each after the modules it imports from."""
    ordered: dict[Path, _Module] = {}
    visiting: set[Path] = set()

    def visit(path: Path) -> None:
        if path in ordered:
            return
        if path in visiting:
            raise ExportError(f"circular imports among inlined modules at {path}")
        visiting.add(path)
        module = _read_module(path, local=not path.is_relative_to(MODELS_DIR))
        for dep in module.deps:
            visit(dep)
        visiting.discard(path)
        ordered[path] = module

    for root in roots:
        visit(root)
    return list(ordered.values())


# --- one namespace for all inlined modules -----------------------------------------------------------------

ENTRY_POINT_NAMES = ("INLINED", "build_model", "load_pretrained", "_resolve")
# The entry points' own imports: an inlined module that imports the same (attention.py's `import importlib`)
# shares the name instead of being renamed (a renamed `import importlib` would name a module that does not exist).
ENTRY_POINT_IMPORTS = {"importlib": ("import", "importlib"), "json": ("import", "json"), "os": ("import", "os"),
                       "F": ("import", "torch.nn.functional")}


class _Namespace:
    """Assigns each top-level binding of the inlined modules a unique name in the generated module."""

    def __init__(self, reserved: tuple[str, ...], imports: dict[str, tuple] | None = None) -> None:
        self.owner: dict[str, tuple] = {name: ("reserved",) for name in reserved}
        self.owner.update(imports or {})
        self.renames: dict[Path, dict[str, str]] = {}

    def add(self, module: _Module) -> None:
        renames = self.renames.setdefault(module.path, {})
        for local_name, (path, name) in module.imported.items():
            renames[local_name] = self.global_name(path, name)
        for name, binding in module.bindings.items():
            unique = name
            while self.owner.get(unique, binding) != binding:
                unique = f"{name}_{module.path.stem}" if unique == name else unique + "_"
            self.owner[unique] = binding
            renames[name] = unique

    def global_name(self, path: Path, name: str) -> str:
        if name not in self.renames.get(path, {}):
            raise ExportError(f"{path} has no top-level name {name!r} to import")
        return self.renames[path][name]

    def local_name(self, obj: Any) -> str:
        """What an inlined class or function is called in the generated module."""
        top, _, rest = obj.__qualname__.partition(".")
        return self.global_name(_source_path(obj), top) + (f".{rest}" if rest else "")

    def public_names(self, modules: list[_Module]) -> list[str]:
        """The inlined modules' public definitions: the targets an edited config.json may name."""
        return sorted(
            self.renames[m.path][name]
            for m in modules
            for name, binding in m.bindings.items()
            if binding[0] == "def" and not name.startswith("_")
        )


def _rename_tokens(source: str, renames: dict[str, str]) -> str:
    """Replace names (not attributes after a dot) by their new spelling, keeping the layout."""
    lines = source.splitlines(keepends=True)
    edits, previous = [], None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        after_dot = previous is not None and previous.type == tokenize.OP and previous.string == "."
        if token.type == tokenize.NAME and renames.get(token.string, token.string) != token.string and not after_dot:
            edits.append(token)
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token
    for token in reversed(edits):
        (row, start), (_, end) = token.start, token.end
        line = lines[row - 1]
        lines[row - 1] = line[:start] + renames[token.string] + line[end:]
    return "".join(lines)


def _render(module: _Module, renames: dict[str, str]) -> str:
    source = _rename_tokens(module.source, {k: v for k, v in renames.items() if k != v})
    kept = [line for number, line in enumerate(source.splitlines(), 1) if number not in module.strip]
    header = [f"# ---- {_display_path(module.path)} ----"]
    if module.docstring:
        header += [f"# {line}".rstrip() for line in module.docstring.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n\n", "\n".join(header + kept).strip()) + "\n"


def _display_path(path: Path) -> str:
    return str(path.relative_to(FORGATHER_DIR.parent)) if path.is_relative_to(FORGATHER_DIR) else path.name


# --- the generated files ------------------------------------------------------------------------------------

MODELING_ENTRY_POINTS = string.Template('''
# ---- standalone entry points ----
import importlib
import json
import os

import torch.nn.functional as F

INLINED = {
$inlined
}


def _resolve(spec):
    """A `_target_`: a class or function inlined above, or 'module:Name' to import."""
    if spec in INLINED:
        return INLINED[spec]
    module, _, qualname = spec.partition(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def build_model(model_tree):
    """The plain nn.Module a config tree (config.json's "model_tree") describes."""
    return instantiate(model_tree, _resolve)


def load_pretrained(directory):
    """Build the model from <directory>/config.json and load model.safetensors -- no transformers needed."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as file:
        model = build_model(json.load(file)["model_tree"])
    state = load_file(os.path.join(directory, "model.safetensors"))
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    return model.eval()


try:
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError:  # the plain model above needs only torch
    PreTrainedModel = None

if PreTrainedModel is not None:
    from .configuration_$module import $config_class

    class $model_class(PreTrainedModel, GenerationMixin):
        """transformers wrapper: `self.model` is the plain model; generate() runs on its own KVCache."""

        config_class = $config_class
        base_model_prefix = "model"
        _no_split_modules = $no_split

        def __init__(self, config):
            super().__init__(config)
            self.model = build_model(config.model_tree)
            self.post_init()

        @classmethod
        def _supports_default_dynamic_cache(cls):
            return False  # past_key_values is this model's KVCache, made in forward()

        def get_input_embeddings(self):
            return self.model.embed

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, labels=None, logits_to_keep=0, **kwargs):
            if position_ids is None and attention_mask is not None and not bool(attention_mask.all()):
                # Left padding as documents: every pad token (position 0) is a document of its own.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, -input_ids.shape[1]:]
            if past_key_values is None:
                # transformers >= 5.24 passes the cache as `cache` (past_key_values is its deprecated name).
                past_key_values = kwargs.pop("cache", None)
            if use_cache and past_key_values is None:
                past_key_values = KVCache(len(self.model.layers))
            hidden = self.model.hidden_states(input_ids, position_ids, past_key_values)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = F.linear(hidden, self.model.lm_head_weight)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            cache = past_key_values if use_cache else None
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
''')

CONFIGURATION_FILE = string.Template('''"""Configuration of the standalone $name model (generated by Forgather).

`model_tree` describes the model: the config tree that modeling's build_model() instantiates.
"""

from transformers import PretrainedConfig


class $config_class(PretrainedConfig):
    model_type = "$model_type"

    def __init__(self, model_tree=None, **kwargs):
        self.model_tree = model_tree or {}
        kwargs.setdefault("tie_word_embeddings", False)  # the model ties its own head; nothing for transformers to tie
        super().__init__(**kwargs)
''')


@dataclass
class GeneratedPackage:
    """The text of the standalone package's files and the names they use."""

    module: str  # the <name> in modeling_<name>.py
    config_class: str
    model_class: str
    modeling: str
    configuration: str
    model_tree: dict  # targets rewritten to the inlined names


def _names(name: str) -> tuple[str, str]:
    module = re.sub(r"\W+", "_", name).strip("_").lower()
    if not module or module[0].isdigit():
        raise ExportError(f"model name {name!r} must start with a letter")
    return module, "".join(part.capitalize() for part in module.split("_"))


def generate_package(model: nn.Module, model_config: Any, name: str, base_dir: str | None = None) -> GeneratedPackage:
    """The standalone source for `model`, built from `model_config` (see the module docstring)."""
    module_name, camel = _names(name)
    config_class, model_class = f"{camel}Config", f"{camel}ForCausalLM"
    tree = plain_tree(model_config)
    tree.pop("_partial_", None)  # a model factory's config describes the model it builds
    resolved = {node["_target_"]: import_spec(node["_target_"], base_dir) for node in _targets(tree)}
    inlined = {spec for spec, obj in resolved.items() if _is_inlined(obj, base_dir)}
    modules = _closure([_source_path(resolved[spec]) for spec in inlined] + [p.resolve() for p in ALWAYS_INLINED])
    namespace = _Namespace(ENTRY_POINT_NAMES + (config_class, model_class), ENTRY_POINT_IMPORTS)
    for module in modules:
        namespace.add(module)
    for node in _targets(tree):
        obj = resolved[node["_target_"]]
        external = f"{obj.__module__}:{obj.__qualname__}"
        node["_target_"] = namespace.local_name(obj) if node["_target_"] in inlined else external
    entry_points = MODELING_ENTRY_POINTS.substitute(
        inlined="".join(f"    {n!r}: {n},\n" for n in namespace.public_names(modules)).rstrip("\n"),
        module=module_name,
        config_class=config_class,
        model_class=model_class,
        no_split=repr(sorted({namespace.local_name(type(layer)) for layer in getattr(model, "layers", [])})),
    )
    modeling = "\n\n".join(
        [f'"""Standalone {name} model generated by Forgather: torch only (transformers for the wrapper)."""\n\n'
         "from __future__ import annotations\n"]
        + [_render(m, namespace.renames[m.path]) for m in modules]
        + [entry_points]
    )
    _check_standalone(modeling)
    configuration = CONFIGURATION_FILE.substitute(
        name=name, config_class=config_class, model_type=f"forgather_{module_name}")
    return GeneratedPackage(module_name, config_class, model_class, modeling, configuration, tree)


def _check_standalone(modeling: str) -> None:
    for node in _forgather_imports(ast.parse(modeling)):
        raise ExportError(f"generated code still imports forgather at line {node.lineno}")


def save_model(
    model: nn.Module,
    model_config: Any,
    out_dir: str | Path,
    name: str,
    base_dir: str | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write the standalone package for `model` (built from `model_config`) into `out_dir`; return it.

    `extra_config` adds keys to config.json, such as the tokenizer's `bos_token_id` / `eos_token_id` /
    `pad_token_id`, which transformers' generate() reads.
    """
    package = generate_package(model, model_config, name, base_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"modeling_{package.module}.py").write_text(package.modeling)
    (out / f"configuration_{package.module}.py").write_text(package.configuration)
    config = {
        "architectures": [package.model_class],
        "auto_map": {
            "AutoConfig": f"configuration_{package.module}.{package.config_class}",
            "AutoModelForCausalLM": f"modeling_{package.module}.{package.model_class}",
        },
        "model_type": f"forgather_{package.module}",
        "model_tree": package.model_tree,
        "tie_word_embeddings": False,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    for key in ("vocab_size", "hidden_size"):
        if isinstance(getattr(model, key, None), int):
            config[key] = getattr(model, key)
    config.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save_weights(model, out / "model.safetensors")
    return out


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {f"model.{key}": value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    # safetensors writes through a private (0600) temporary file; give the weights the mode of the other files.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it back is racy)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_standalone_module(directory: str | Path) -> types.ModuleType:
    """Import an exported package's modeling_<name>.py as a submodule of a synthetic package (for its
    relative import of the configuration), without transformers' remote-code machinery."""
    directory = Path(directory).resolve()
    config = json.loads((directory / "config.json").read_text())
    module_file = config["auto_map"]["AutoModelForCausalLM"].split(".")[0]
    # Keyed by the code too, so a package re-exported into the same directory is imported afresh.
    code = (directory / f"{module_file}.py").read_bytes()
    package_name = "forgather_export_" + hashlib.sha1(str(directory).encode() + code).hexdigest()[:12]
    if package_name not in sys.modules:
        package = types.ModuleType(package_name)
        package.__path__ = [str(directory)]
        sys.modules[package_name] = package
    return importlib.import_module(f"{package_name}.{module_file}")


def load_model(directory: str | Path) -> nn.Module:
    """The plain nn.Module of an exported package, in eval mode, weights loaded."""
    return load_standalone_module(directory).load_pretrained(str(directory))
