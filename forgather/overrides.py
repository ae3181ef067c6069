"""Command-line overrides, in Hydra's grammar (parsed by hydra-core's own parser), applied to our config.

    group=option      pick GROUP/OPTION.yaml for a group the templates include (`optimizer=adafactor`);
                      `+experiment=NAME` picks the experiment. Group choices are template variables.
    a.b=v             change an existing value (an unknown key is an error with close-match suggestions;
                      a value of the wrong type is an error too: checked against the annotation of the
                      parameter in the target's signature where there is one, else against the current
                      value, or the value an interpolation there resolves to)
    +a.b=v            add a key that does not exist yet
    ++a.b=v           set a key either way
    ~a.b              delete a key (`~a.b=v`: only where it holds v)
A mapping value merges into the mapping there, as in Hydra (`d={a:5}` keeps d's other keys); an interpolation
value (`lr=${base_lr}`) is set as written.
Sweeps (`-m`): `a=1,2`, `a=range(1,4)`, `a=choice(x,y)`, `group=glob(ada*)` expand into the cartesian
product of single runs, in command-line order.

A group is a directory of YAML templates on the search path; its options are the file names.
Construction errors name the override that set the failing key, or a key it reads (`naming_overrides`).
This module never imports torch itself (checking a value against a signature imports that target).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from forgather.errors import UserError, causes, did_you_mean


class OverrideError(UserError, ValueError):
    """A bad override: the message names it and says what would be valid."""


@dataclass(frozen=True)
class Override:
    """One parsed override with a single value (sweeps are expanded before this)."""

    kind: str  # "change", "add", "force_add", "delete"
    key: str
    value: Any
    text: str


_KINDS = {"CHANGE": "change", "ADD": "add", "FORCE_ADD": "force_add", "DEL": "delete"}


def find_groups(search_path: list[str]) -> dict[str, list[str]]:
    """Groups on the search path: every directory (at any depth) holding .yaml files, by relative path."""
    groups: dict[str, set[str]] = {}
    for root in search_path:
        for parent, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            options = {os.path.splitext(f)[0] for f in files if f.endswith(".yaml")}
            group = os.path.relpath(parent, root)
            if options and group != ".":
                groups.setdefault(group.replace(os.sep, "/"), set()).update(options)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def declared_by_options(key: str, search_path: list[str], groups: dict[str, list[str]]) -> list[str]:
    """`GROUP=OPTION` for each group option whose template declares the config value `key` (a `!var` of that
    name): where a key missing from this config lives, when another option of a group holds it
    (`bucket_size` is optimizer=adamw_in_backward's). Read as text: nothing is rendered."""
    if "." in key:
        return []
    declared = re.compile(r"!var\s*(?:\{\s*name:\s*)?[\"']?" + re.escape(key) + r"[\"']?\s*(?:[,}]|$)", re.MULTILINE)
    found = []
    for group, options in groups.items():
        if group == "experiment":
            continue
        for option in options:
            for root in search_path:
                path = os.path.join(root, *group.split("/"), f"{option}.yaml")
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as f:
                        if declared.search(f.read()):
                            found.append(f"{group}={option}")
                    break
    return found


def suggest(word: str, candidates: list[str]) -> str:
    hint = did_you_mean(word, candidates)
    return f"; {hint}" if hint else ""


# Names other tools give our config keys (Hugging Face's config and Trainer, nanoGPT, Lightning's Fabric
# scripts): too far from ours for a close-spelling match (`num_hidden_layers` / `num_layers`), yet what a
# user coming from them types first. Each maps to our key's last part.
_ALSO_CALLED = {
    "block_size": ("seq_len", "seq_length", "sequence_length", "max_seq_len", "max_seq_length", "max_length",
                   "context_length", "n_positions", "max_position_embeddings"),
    "lr": ("learning_rate",),
    "max_steps": ("steps", "num_steps", "total_steps", "train_steps", "max_iters"),
    "max_epochs": ("epochs", "num_epochs", "num_train_epochs"),
    "batch_size": ("bs", "per_device_train_batch_size", "micro_batch_size", "train_batch_size"),
    "warmup_steps": ("warmup", "num_warmup_steps", "warmup_iters"),
    "gradient_clip_val": ("grad_clip", "max_grad_norm", "clip_grad_norm", "gradient_clipping"),
    "accumulate_grad_batches": ("gradient_accumulation_steps", "grad_accum"),
    "weight_decay": ("wd",),
    "num_layers": ("n_layer", "n_layers", "num_hidden_layers"),
    "hidden_size": ("n_embd", "d_model", "dim", "embed_dim"),
    "num_heads": ("n_head", "n_heads", "num_attention_heads"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "intermediate_size": ("ffn_dim", "ffn_hidden_size", "d_ff", "mlp_dim"),
    "vocab_size": ("vocab", "n_vocab"),
}


def _also_called(key: str, paths: list[str]) -> str:
    """"; it is called 'block_size' here" when `key` is another tool's name for one of the config's keys."""
    last = key.rsplit(".", 1)[-1]
    for ours, theirs in _ALSO_CALLED.items():
        if last in theirs:
            found = [p for p in paths if p == ours] or [p for p in paths if p.rsplit(".", 1)[-1] == ours]
            if found:
                return f"; it is called {found[0]!r} here ({found[0]}=...)"
    return ""


def parse_hydra(arguments: list[str]) -> list[Any]:
    """Hydra's parse of `arguments` (its Override objects); an override its grammar refuses is an OverrideError
    naming that override (every reader of the command line's overrides goes through here)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(list(arguments))
    except HydraException as error:
        raise OverrideError(_parse_failure(parser, list(arguments), error)) from error


def _parse_failure(parser: Any, arguments: list[str], error: Exception) -> str:
    """The one-line report of overrides Hydra's grammar refused: the first override that fails alone, and the
    grammar's complaint about it (its lines that say what is wrong: not the heading that repeats the override,
    a caret, or the link)."""
    from hydra.errors import HydraException

    for argument in arguments:
        try:
            parser.parse_overrides([argument])
        except HydraException as own:
            lines = [line.strip() for line in str(own).splitlines()]
            said = [line for line in lines if line.strip("^ ") and not line.startswith(("Error parsing override", "See https:"))]
            reason = " ".join(said) or lines[0]
            return (f"{argument}: cannot parse this override ({reason}) ; write key=value, a sweep's values "
                    f"separated by commas (lr=1e-3,3e-3), and quote a value holding commas, brackets or "
                    f"spaces ('key=\"a, b\"')")
    return f"cannot parse overrides: {str(error).splitlines()[0]}"


def parse(arguments: list[str], groups: dict[str, list[str]], multirun: bool) -> list[list[Override]]:
    """Parse overrides; returns one list of single-valued overrides per run (one run unless sweeping)."""
    parsed = parse_hydra(arguments)
    axes: list[list[Override]] = []
    for item in parsed:
        kind = _KINDS[item.type.name]
        key = item.key_or_group
        if item.package:
            raise OverrideError(f"{item.input_line}: packages (@) are not supported")
        if item.is_sweep_override():
            if not multirun:
                raise OverrideError(f"{item.input_line} sweeps over several values: add -m to run them all")
            # Each point's text is its own single-valued override (as Hydra's sweeper writes it), for the
            # point's snapshot and for errors naming it.
            axes.append([Override(kind, key, value, f"{item.get_key_element()}={text}") for value, text in sweep_values(item, groups.get(key))])
        else:
            axes.append([Override(kind, key, item.value(), item.input_line)])
    return [list(point) for point in itertools.product(*axes)]


def sweep_values(item, options: list[str] | None) -> list[tuple[Any, str]]:
    """(value, its text in the override grammar) of every point of a sweep."""
    from hydra.core.override_parser.types import Glob, IntervalSweep

    value = item.value()
    if isinstance(value, IntervalSweep):
        raise OverrideError(f"{item.input_line}: interval() describes a search space, which sweeper=optuna searches "
                            f"and no grid enumerates: add sweeper=optuna, or list values (key=a,b,c)")
    if isinstance(value, Glob):
        if options is None:
            raise OverrideError(f"{item.input_line}: glob() selects options of a group, and {item.key_or_group!r} is none")
        chosen = value.filter(options)
        if not chosen:
            raise OverrideError(f"{item.input_line} matches no option of group {item.key_or_group!r}: {', '.join(options)}")
        return [(option, option) for option in chosen]
    try:
        texts = list(item.sweep_string_iterator())
    except ValueError as error:  # range(1,10,0): Python's range refuses a zero step
        raise OverrideError(f"{item.input_line}: {error}") from error
    if not texts:
        raise OverrideError(f"{item.input_line} gives no values to sweep: a range(start,stop[,step]) stops before "
                            f"`stop` and counts down only with a negative step (range(5,1,-1))")
    # Hydra's sweeper hands each job its point as the text `key=value`, which the job parses again; the value
    # comes from that text too, so a quoted 'b c' is the string b c (not the parser's QuotedString), a
    # str(choice(1,2)) point is the int 1 as in Hydra, and a shuffle() is drawn once for values and texts.
    key = item.get_key_element()
    return [(point.value(), text) for point, text in zip(parse_hydra([f"{key}={text}" for text in texts]), texts)]


def split_choices(overrides: list[Override], groups: dict[str, list[str]]) -> tuple[dict[str, str], list[Override]]:
    """Separate group choices (template variables) from value overrides, validating the choices: each an option
    of its group, and one option a group (`+experiment=a +experiment=b` is a mistake, as in Hydra)."""
    choices: dict[str, str] = {}
    values: list[Override] = []
    for override in overrides:
        if override.key not in groups or override.kind == "delete":
            values.append(override)
            continue
        options = groups[override.key]
        option = str(override.value)
        if option not in options:
            raise OverrideError(
                f"{override.text}: no option {option!r} in group {override.key!r}{suggest(option, options)} "
                f"(options: {', '.join(options)})"
            )
        if choices.setdefault(override.key, option) != option:
            chosen = choices[override.key]
            raise OverrideError(f"{override.text}: group {override.key!r} is already chosen ({override.key}={chosen}); "
                                f"give one option, or sweep them with -m {override.key}={chosen},{option}")
    return choices, values


# -- applying value overrides to a config -------------------------------------------------------------


def config_paths(config: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every key in a config (reserved `_x_` keys skipped, interpolations not followed)."""
    paths = []
    keys = [key for key, _ in config.items_ex(resolve=False)] if isinstance(config, DictConfig) else range(len(config))
    for key in keys:  # (iterating a ListConfig would resolve its elements)
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            continue
        path = f"{prefix}{key}"
        paths.append(path)
        child = config._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            paths += config_paths(child, path + ".")
    return paths


LIST_TARGETS = ("list", "builtins:list", "builtins.list")


def _list_hint(config: DictConfig, key: str) -> str:
    """Where `key` goes through a list by name (`trainer.callbacks.checkpoint.save_last`: a `!dlist`'s names
    do not survive into the config, which holds `{_target_: list, _args_: [[...]]}`): how to address the
    element by position instead, the element whose target resembles the name first. "" when `key` does not
    pass through a list."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        found = _locate(config, prefix)
        if found is None:
            continue
        parent, last = found
        node = parent._get_node(last)
        elements, path = node, prefix
        if isinstance(node, DictConfig) and not node._is_interpolation():
            arguments = node.get("_args_") if node.get("_target_") in LIST_TARGETS else None
            if not (isinstance(arguments, ListConfig) and len(arguments) == 1 and isinstance(arguments[0], ListConfig)):
                return ""
            elements, path = arguments[0], f"{prefix}._args_.0"
        if not isinstance(elements, ListConfig) or parts[depth].lstrip("-").isdigit():
            return ""
        labels = [str(e.get("_target_", "?")).replace(":", ".").rsplit(".", 1)[-1] if isinstance(e, DictConfig)
                  else type(e).__name__ for e in elements]
        name = parts[depth].lower().replace("_", "")
        index = next((i for i, label in enumerate(labels) if name in label.lower() or label.lower() in name), 0)
        rest = ".".join(parts[depth + 1:])
        where = ", ".join(f"{i}: {label}" for i, label in enumerate(labels))
        return (f"; {prefix} is a list, whose elements go by position ({where}): write "
                f"{path}.{index}{'.' + rest if rest else ''}=...")
    return ""


def _locate(config: DictConfig, key: str) -> tuple[Any, str | int] | None:
    """(parent node, last key) of `key`, or None where a part is missing. Never follows interpolations."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        index: str | int = int(part) if isinstance(node, ListConfig) and part.lstrip("-").isdigit() else part
        if not isinstance(node, (DictConfig, ListConfig)):  # `lr.x` where lr is a number: nothing below it
            return None
        if isinstance(node, ListConfig):
            if not isinstance(index, int) or not -len(node) <= index < len(node):
                return None
        elif index not in node.keys():  # `in node` is False for a key whose value is missing (`???`)
            return None
        if depth == len(parts) - 1:
            return node, index
        child = node._get_node(index)
        if child._is_interpolation():
            reference = child._value()
            raise OverrideError(
                f"{'.'.join(parts[: depth + 1])} refers to {reference}: override through the referenced key instead "
                f"({reference[2:-1]}.{'.'.join(parts[depth + 1:])}=...)"
            )
        node = child
    return None


def _builds_an_object(node: DictConfig) -> bool:
    """Whether a `_target_` node makes an object (a class, or a partial), rather than computing a value
    (`len(tokenizer)`), which an override may replace by a literal."""
    import inspect

    from forgather.graph.imports import import_spec

    if node.get("_partial_") or node.get("_factory_"):
        return True
    try:
        return inspect.isclass(import_spec(str(node._target_)))
    except ImportError:
        return True


def _parameter(parent: Any, name: str | int) -> inspect.Parameter | None:
    """The parameter `name` of the target of the `_target_` node `parent`, annotations evaluated; None where
    unknown (no target, not importable, no such named parameter, no signature)."""
    from forgather.graph.imports import import_spec

    if not isinstance(parent, DictConfig) or not isinstance(name, str) or "_target_" not in parent:
        return None
    try:
        target = import_spec(str(parent._get_node("_target_")._value()))
        parameter = inspect.signature(target).parameters.get(name)
    except Exception:  # not importable here (construction will say why) or no signature (builtins)
        return None
    if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return None
    try:
        function = target.__init__ if inspect.isclass(target) else target
        return parameter.replace(annotation=typing.get_type_hints(function).get(name, parameter.annotation))
    except Exception:  # an annotation that does not evaluate (names imported only for type checkers)
        return parameter


_NUMBERS = (int, float, complex)


def _accepts(annotation: Any, value: Any) -> bool | None:
    """Whether an override value (None, bool, int, float, str, list or dict) fits a type annotation:
    True, False, or None where it cannot tell (a string may be converted by the target, a forward reference)."""
    if annotation in (inspect.Parameter.empty, Any) or isinstance(annotation, (str, typing.ForwardRef, typing.TypeVar)):
        return None
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(member, value) for member in typing.get_args(annotation)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return any(type(value) is type(option) and value == option for option in typing.get_args(annotation))
    kind = origin or annotation
    if not isinstance(kind, type):
        return None
    if value is None:
        return False
    if isinstance(value, str):
        return True if issubclass(str, kind) else (False if kind in (bool, *_NUMBERS) else None)
    if kind is str and not isinstance(value, (list, dict)):
        return None  # `name=123` parses as an int; a string parameter may take it as text
    if isinstance(value, bool):
        return kind is bool or kind is object
    if isinstance(value, int) and kind in _NUMBERS:
        return True
    try:
        return isinstance(value, kind)
    except TypeError:  # a Protocol that is not runtime-checkable
        return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(member) for member in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def _check_signature(override: Override, parent: Any, last: str | int, config: DictConfig | None = None) -> bool:
    """Check the value against the target's annotation of the parameter; True when the annotation accepts it
    (so the current value's type does not matter: `gradient_clip_val: int | float`). A config value that no
    target takes itself (a template's `!var`) is checked against the parameters that take it through an
    interpolation (`fused_projections: ${fused_projections}`): True when each of them that says accepts it
    (`fused_projections=kv` where the template's default is false); else the current value's type decides."""
    parameter = _parameter(parent, last)
    value = override.value
    if parameter is None:
        takers = [_parameter(*site) for site in _consumers(config, override.key)]
        verdicts = [_accepts(taker.annotation, value) for taker in takers if taker is not None]
        return bool(verdicts) and all(verdict is True for verdict in verdicts)
    verdict = True if value is None and parameter.default is None else _accepts(parameter.annotation, value)
    if verdict is False:
        target = str(parent._get_node("_target_")._value())
        raise OverrideError(
            f"{override.text}: {target} takes {last}: {_type_name(parameter.annotation)}; "
            f"got {type(value).__name__} {value!r}"
        )
    return bool(verdict)


def _consumers(config: Any, key: str) -> list[tuple[Any, str | int]]:
    """Every (parent, name) in `config` whose value is exactly the interpolation `${key}`."""
    if config is None:
        return []
    found, reference = [], "${" + key + "}"
    if isinstance(config, DictConfig):
        names = [name for name, _ in config.items_ex(resolve=False)]
    else:
        names = range(len(config))
    for name in names:  # (iterating a ListConfig would resolve its elements)
        child = config._get_node(name)
        if child._is_interpolation():
            if child._value() == reference:
                found.append((config, name))
        elif isinstance(child, (DictConfig, ListConfig)):
            found += _consumers(child, key)
    return found


def _current_value(parent: Any, last: str | int) -> Any:
    """The value an override replaces; for an interpolation, the value it resolves to (None if it does not)."""
    node = parent._get_node(last)
    if isinstance(node, (DictConfig, ListConfig)) and not node._is_interpolation():
        return node
    if not node._is_interpolation():
        return node._value()
    try:
        resolved = node._dereference_node()
    except Exception:  # a missing value, a custom resolver: nothing to compare with
        return None
    return resolved if isinstance(resolved, (DictConfig, ListConfig)) else resolved._value()


def _check_args(override: Override) -> None:
    if override.key.rpartition(".")[2] == "_args_" and not isinstance(override.value, list):
        raise OverrideError(
            f"{override.text}: _args_ holds the positional arguments of the node's target, a list; "
            f"got {type(override.value).__name__} (write {override.key}=[{override.value!r}])"
        )


def _check_type(override: Override, old: Any) -> None:
    key, new = override.key, override.value
    if OmegaConf.is_dict(old) and "_target_" in old and not isinstance(new, dict) and _builds_an_object(old):
        raise OverrideError(f"{override.text}: {key} is a component ({old._target_}); override its arguments ({key}.NAME=...) or choose a group option")
    if old is None or isinstance(old, str) or new is None or OmegaConf.is_config(old):
        return
    numeric = (int, float)
    if isinstance(old, bool) or isinstance(new, bool):
        compatible = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, numeric):
        compatible = isinstance(new, numeric) and not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    else:
        compatible = True
    if not compatible:
        raise OverrideError(f"{override.text}: {key} is {type(old).__name__} ({old!r}); got {type(new).__name__} {new!r}")


def _named_node_paths(config: DictConfig) -> dict[str, str]:
    """`_id_` -> dotted path of every named node written in place (interpolations not followed)."""
    found: dict[str, str] = {}
    for path in config_paths(config):
        parent, last = _locate(config, path)
        node = parent._get_node(last)
        if isinstance(node, DictConfig) and not node._is_interpolation() and "_id_" in node:
            found[str(node._get_node("_id_")._value())] = path
    return found


def _refuse_adding_beside_a_named_node(config: DictConfig, override: Override) -> None:
    """`++feedforward_factory.x=v` would add a new top-level key that nothing reads when the node named
    feedforward_factory is written where it is used (model.layer_factory.feedforward_factory): say where it is."""
    head, _, rest = override.key.partition(".")
    if not rest or head in config.keys():
        return
    path = _named_node_paths(config).get(head)
    if path is not None:
        raise OverrideError(
            f"{override.text}: the node {head!r} is at {path}; write {'+' if override.kind == 'add' else '++'}{path}.{rest}=..."
        )


def unread_additions(config: DictConfig, overrides: list[Override], runner_keys: tuple[str, ...] = ()) -> list[Override]:
    """The overrides among `overrides` that add (`+key=v`, `++key=v`) a top-level key that nothing in `config`
    reads: no interpolation names it, and the runner does not read it itself (`runner_keys`). Top-level keys
    are config values, read only through interpolations, so such a value changes nothing."""
    added = [o for o in overrides if o.kind in ("add", "force_add") and "." not in o.key and o.key not in runner_keys]
    if not added:
        return []
    text = str(OmegaConf.to_container(config, resolve=False))
    return [o for o in added if not re.search(r"\$\{[^}]*\b" + re.escape(o.key) + r"\b", text)]


# How close a key of this config must be to a missing key to be suggested before the group options that declare
# the missing one: a near-identical spelling (data_path / data_paths), not a loose likeness (bucket_size /
# block_size).
NEAR_SPELLING = 0.85


def config_value_of(key: str, options: list[str]) -> str:
    """"KEY is a config value of GROUP=OPTION or ..." for the group options that declare `key` (at most three
    named): said where a key this config lacks is set, or added without being read."""
    listed = " or ".join(options[:3]) + (" ..." if len(options) > 3 else "")
    return f"{key} is a config value of {listed}"


def _close_or_elsewhere(key: str, paths: list[str], options: list[str]) -> str:
    """The hint for a key this config lacks: its close spellings here, and the group options that declare it
    (`options`); a near-identical spelling here comes first when both are found."""
    if not options:
        return suggest(key, paths)
    elsewhere = f"{config_value_of(key, options)}: choose that option, or leave {key} out"
    near = did_you_mean(key, paths, cutoff=NEAR_SPELLING)
    return f"; {near} ({elsewhere})" if near else f"; {elsewhere}"


def apply(config: DictConfig, overrides: list[Override],
          declared_by: Callable[[str], list[str]] | None = None) -> None:
    """Apply value overrides in order, in place. Errors name the override and suggest close keys; a key this
    config lacks that a group option declares (`declared_by(key)`, e.g. `declared_by_options`) names that option.
    A deleted key that the config still reads (`${key}`) once all are applied is an error naming the readers."""
    deleted: list[Override] = []
    for override in overrides:
        key = override.key
        found = _locate(config, key)
        if override.kind in ("change", "delete") and found is None:
            paths = config_paths(config)
            hint = (_list_hint(config, key) or _also_called(key, paths)
                    or _close_or_elsewhere(key, paths, declared_by(key) if declared_by else []))
            raise OverrideError(f"{override.text}: no key {key!r} in the config{hint}")
        if override.kind == "add" and found is not None:
            raise OverrideError(f"{override.text}: {key!r} is already set; write {key}=... to change it (or ++{key}=...)")
        if override.kind in ("add", "force_add") and found is None:
            _refuse_adding_beside_a_named_node(config, override)
        if override.kind == "delete":
            parent, last = found
            _check_deleted_value(config, override)
            del parent[last]
            deleted.append(override)
            continue
        _check_args(override)
        if override.kind == "change" and not _is_interpolation(override.value):  # (checked where it resolves)
            parent, last = found
            if not _check_signature(override, parent, last, config):
                _check_type(override, _current_value(parent, last))
        _update(config, override)
    _refuse_dangling_references(config, deleted)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_deleted_value(config: DictConfig, override: Override) -> None:
    """`~key=value` deletes only where key holds that value (Hydra's rule; `~key` deletes whatever it holds)."""
    if override.value is None:
        return
    try:
        current = OmegaConf.select(config, override.key, throw_on_missing=False)
    except Exception:  # an interpolation that does not resolve: what it says
        parent, last = _locate(config, override.key)
        current = parent._get_node(last)._value()
    if current is None or current != override.value:
        shown = OmegaConf.to_container(current, resolve=False) if OmegaConf.is_config(current) else current
        raise OverrideError(f"{override.text}: {override.key} is {shown!r}, not {override.value!r}; "
                            f"write ~{override.key} to delete it whatever it holds")


def _update(config: DictConfig, override: Override) -> None:
    """Set the value as Hydra does: a mapping merges into the mapping there (`d={a:5}` keeps d's other keys;
    `~d +d={a:5}` replaces d whole). Unlike Hydra, which refuses a key new to d there unless `++d={c:1}`, the
    mapping may add keys (`launcher.additional_parameters={account: ml}` over the default `{}`)."""
    from omegaconf.errors import ConfigIndexError, OmegaConfBaseException

    try:
        OmegaConf.update(config, override.key, override.value, merge=True, force_add=True)
    except ConfigIndexError as error:
        parent, _, index = override.key.rpartition(".")
        raise OverrideError(f"{override.text}: {parent} has no element {index} and a list does not grow by index; "
                            f"give the whole list ({parent}=[...])") from error
    except OmegaConfBaseException as error:  # a mapping merged into a list (`list={a:1}`)
        raise OverrideError(f"{override.text}: {str(error).splitlines()[0]}; write ~{override.key} "
                            f"+{override.text.lstrip('+')} to replace {override.key} whole") from error


def _refuse_dangling_references(config: DictConfig, deleted: list[Override]) -> None:
    """A deleted key that some value still reads through `${key}` (or `${key.sub}`) would fail only when the
    config is resolved, far from the override, as a bare KeyError: it is refused here, naming its readers."""
    for override in deleted:
        if _locate(config, override.key) is not None:  # added again by a later override
            continue
        readers = [(path, ref) for path, text in _strings(OmegaConf.to_container(config, resolve=False), "")
                   for ref in _REFERENCE.findall(text) if ref == override.key or ref.startswith(override.key + ".")]
        if readers:
            named = ", ".join(f"{path} (${{{ref}}})" for path, ref in readers[:3]) + (f" and {len(readers) - 3} more" if len(readers) > 3 else "")
            raise OverrideError(f"{override.text}: the config still reads {override.key} at {named}; delete or set those "
                                f"too, or give {override.key} another value instead of deleting it")


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(dotted path, text) of every string in a config container, depth first."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}.{index}" if path else str(index))


# -- naming the overrides behind a construction error ------------------------------------------------

_REFERENCE = re.compile(r"\$\{([\w.]+)\}")


def _keys_read_at(config: DictConfig, path: str) -> set[str]:
    """`path` and every key its subtree refers to through interpolations, followed transitively."""
    keys: set[str] = set()
    todo = [path]
    while todo:
        key = todo.pop()
        if key in keys:
            continue
        keys.add(key)
        try:
            found = _locate(config, key)
        except OverrideError:
            found = None
        if found is None:
            continue
        node = found[0]._get_node(found[1])
        data = OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node._value()
        todo += _REFERENCE.findall(str(data))
    return keys


# How libraries word some keys in their errors (torch.optim: "Invalid learning rate: -1", "Invalid epsilon
# value", "Invalid beta parameter at index 0").
_WORDED_AS = {"lr": ("learning rate",), "eps": ("epsilon",), "betas": ("beta parameter",),
              "attention_kernel_options": ("kernel_options",)}  # the llama template's name for Attention's


def _names(text: str, key: str) -> bool:
    """Whether an error's text names the config key `key` (its last part), or words it as a library does."""
    words = (key, *_WORDED_AS.get(key, ()))
    return any(re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE if word != key else 0) for word in words)


def _failing_path(error: BaseException) -> str | None:
    from forgather.graph.construct import ConstructError

    return next((e.path for e in causes(error) if isinstance(e, ConstructError)), None)


def _blamed(error: BaseException, config: DictConfig, overrides: list[Override]) -> tuple[list[Override], bool]:
    """(overrides behind `error`, whether the error names them). Those whose key the message names, among
    those the failing node reads (or among all, when the error has no config path: an optimizer partial
    called by Lightning); else every override the failing node reads."""
    path = _failing_path(error)
    candidates = overrides
    if path is not None:
        read = _keys_read_at(config, path)
        candidates = [o for o in overrides if any(o.key == k or k.startswith(o.key + ".") or o.key.startswith(k + ".") for k in read)]
    text = "\n".join(str(e) for e in causes(error))
    named = [o for o in candidates if _names(text, o.key.rpartition(".")[2])]
    if named:
        return named, True
    return (candidates, False) if path is not None else ([], False)


@contextlib.contextmanager
def naming_overrides(config: DictConfig, overrides: list[Override]) -> Iterator[None]:
    """Around construction and training: a failure gets a note naming the overrides behind it (see
    `_blamed`): `weight_decay=-1.0` behind a failing optimizer."""
    try:
        yield
    except Exception as error:
        blamed, named = _blamed(error, config, overrides)
        if blamed:
            texts = " ".join(o.text for o in blamed)
            plural = "s" if len(blamed) > 1 else ""
            error.add_note(f"set by the override{plural} {texts}" if named else f"it reads the override{plural} {texts}")
        raise
