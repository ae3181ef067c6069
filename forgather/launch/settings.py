"""Choosing and configuring the launcher and the sweeper, in Hydra's words.

`launcher=NAME` picks `launcher/NAME.yaml` on the template search path (first found; the library's are in
conf/launcher/), a plain YAML mapping: `_target_` (the class) and its settings. `launcher.KEY=V` changes a
setting; the same for `sweeper`. The experiment's template may choose both under a top-level `hydra:` key,
a name or a mapping with `name:` and settings (`hydra: {launcher: {name: local, jobs: 2}, sweeper: {params:
{lr: 1e-3,3e-4}}}`), which the command line overrides; `params` are the sweep's overrides, put before the
command line's. Unknown names and keys, and values of the wrong type for the class's signature, are errors
naming the override, before any point starts.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from forgather import overrides as ovr

GROUPS = ("launcher", "sweeper")
DEFAULTS = {"launcher": "local", "sweeper": "basic"}
# The key of an experiment's config that holds the runner's own settings (Hydra's name for them).
TEMPLATE_KEY = "hydra"


def is_runner_override(text: str) -> bool:
    """Whether an override sets the launcher or the sweeper (`launcher=local`, `sweeper.n_trials=6`)."""
    key = text.lstrip("+~").split("=", 1)[0]
    return key.split(".", 1)[0] in GROUPS


def options(search_path: list[str], group: str) -> list[str]:
    return sorted({f[:-5] for root in search_path if os.path.isdir(os.path.join(root, group)) for f in os.listdir(os.path.join(root, group)) if f.endswith(".yaml")})


def _load_option(search_path: list[str], group: str, name: str, said: str) -> DictConfig:
    for root in search_path:
        path = os.path.join(root, group, f"{name}.yaml")
        if os.path.isfile(path):
            return OmegaConf.load(path)
    found = options(search_path, group)
    hint = ovr.suggest(str(name), found)
    other = difflib.get_close_matches(str(name).lower(), list(_ALSO_CALLED), n=1, cutoff=0.75)
    if not hint and other and _ALSO_CALLED[other[0]][0] in found:  # another tool's name for one of ours
        launcher, what = _ALSO_CALLED[other[0]]
        hint = f"; {group}={launcher} {what}"
    raise ovr.OverrideError(f"{said}: no {group} {name!r}{hint} (options: {', '.join(found)})")


# What a user may call a launcher or a sweeper after a cluster's scheduler, Hydra's plugins or other search
# libraries -> ours, and what it does (a hint only where ours is an option of the group named).
_SLURM = ("submitit", "submits to Slurm")
_PARALLEL = ("local", "runs points in parallel on this machine (launcher.jobs=N at a time)")
_SEARCH = ("optuna", "searches the space (TPE by default; sweeper.sampler=random)")
_ALSO_CALLED = {
    "slurm": _SLURM, "sbatch": _SLURM,
    "parallel": _PARALLEL, "joblib": _PARALLEL, "multiprocessing": _PARALLEL,
    "basic": ("local", "runs the points on this machine, one at a time unless launcher.jobs=N"),
    "grid": ("basic", "enumerates every combination of the swept values"),
    "random": ("optuna", "with sweeper.sampler=random"),
    "tpe": ("optuna", "with sweeper.sampler=tpe (its default)"),
    "hyperopt": _SEARCH, "bayesian": _SEARCH, "nevergrad": _SEARCH, "ax": _SEARCH,
}


def _check_belongs(search_path: list[str], group: str, name: str, node: DictConfig, override: ovr.Override) -> None:
    """`sweeper.n_trials=6` with the basic sweeper: a setting of another option is named with that option
    (the override's own check only says that the key is missing)."""
    prefix, _, key = override.key.partition(".")
    if prefix != group or not key or override.kind != "change" or key.split(".")[0] in node:
        return
    first = key.split(".")[0]
    others = {option: _load_option(search_path, group, option, override.text)
              for option in options(search_path, group) if option != name}
    owners = [option for option, settings in others.items() if first in settings]
    if owners:
        choose = " or ".join(f"{group}={owner}" for owner in owners)
        raise ovr.OverrideError(f"{override.text}: {key} is a setting of {choose}, not of {group}={name}; add {choose}")
    if difflib.get_close_matches(first, [str(k) for k in node], n=1):
        return  # a misspelling of one of its own settings: the override's own check suggests it
    for option, settings in others.items():  # `sweeper.n_trails=4` with the basic sweeper
        close = difflib.get_close_matches(first, [str(k) for k in settings], n=1)
        if close:
            raise ovr.OverrideError(f"{override.text}: no setting {first!r} in {group}={name}; did you mean "
                                    f"{group}.{close[0]}, a setting of {group}={option} (add {group}={option})?")


@dataclass
class Settings:
    launcher: DictConfig
    sweeper: DictConfig
    params: list[str]  # the sweep's overrides from the template's hydra.sweeper.params

    def build(self, group: str) -> Any:
        """The launcher or sweeper object its settings describe."""
        from forgather.graph.imports import import_spec

        node = getattr(self, group)
        kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
        return import_spec(str(node._target_))(**kwargs)


def resolve(search_path: list[str], arguments: list[str], template: Any = None) -> Settings:
    """Settings from the template's `hydra:` mapping (`template`, may be None) and the runner overrides
    `arguments` (`launcher=NAME`, `launcher.KEY=V`, ...), which win."""
    template = OmegaConf.to_container(template, resolve=True) if OmegaConf.is_config(template) else (template or {})
    for item in ovr.parse_hydra(arguments):
        if item.is_sweep_override():  # ovr.parse would say to add -m, which the sweep has
            raise ovr.OverrideError(f"{item.input_line}: a launcher or sweeper setting takes one value, not a sweep ; "
                                    f"write a list in brackets ({item.get_key_element()}=[a,b])")
    parsed = ovr.parse(arguments, {}, multirun=False)[0]
    chosen: dict[str, DictConfig] = {}
    params: list[str] = []
    for group in GROUPS:
        from_template = template.get(group) or {}
        if isinstance(from_template, str):
            from_template = {"name": from_template}
        name, said = from_template.pop("name", DEFAULTS[group]), f"{TEMPLATE_KEY}.{group}.name in the experiment"
        for override in parsed:
            if override.key == group:
                name, said = override.value, override.text
        node = _load_option(search_path, group, str(name), said)
        if group == "sweeper":
            given = from_template.pop("params", None) or {}
            params = [f"{key}={value}" for key, value in given.items()]
        config = OmegaConf.create({group: node})
        for override in parsed:
            _check_belongs(search_path, group, str(name), node, override)
        from_template_overrides = [ovr.Override("change", f"{group}.{k}", v, f"{TEMPLATE_KEY}.{group}.{k}={v!r} in the experiment") for k, v in from_template.items()]
        ovr.apply(config, [*from_template_overrides, *(o for o in parsed if o.key.startswith(f"{group}."))])
        chosen[group] = config[group]
    return Settings(chosen["launcher"], chosen["sweeper"], params)
