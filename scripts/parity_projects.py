"""Parity with the reference Forgather on its own projects: same YAML, same node graph.

    .venv/bin/python scripts/parity_projects.py /work/ref-forgather [-v] [--json out.json]

For every project under the checkout (a directory with a meta.yaml) and every config of it, renders the
config with us (`forgather pp`) and with the reference (its MetaConfig + ConfigEnvironment, the API behind
its `forgather pp`, run in a subprocess with `PYTHONPATH=<checkout>/src`), then counts per config:

    loads          our template stage renders it (meta.yaml read, template rendered)
    same YAML      our rendered YAML equals the reference's, comments, blank lines and time stamps aside
    graph loads    our graph stage reads our YAML
    same graph     our node graph equals the reference's (targets, call kinds, import specs, arguments,
                   names, latent args, submodule search paths, and which nodes are shared; time stamps
                   in strings masked)
    graph of ref   our graph stage, run on the reference's YAML, gives the reference's graph: this isolates
                   the graph stage from the template stage (a node named only by us is no difference:
                   the reference reads `!dict@name`, without the colon, as unnamed)
    config+code    our graph converts to the OmegaConf config and to Python code (`forgather code`)
    config+code of ref   the same, from the graph of the reference's YAML

Configs the reference itself cannot render are counted apart and left out of the other counts. A config
with 'graph of ref' but not 'same graph' differs in the template stage only.

`--construct` then builds every target of every config with us (one subprocess per config, Hugging Face
offline), and sorts each target into: built; needs the reference's own library (`forgather.ml` ...), which
this Forgather does not include; a `!var` its caller sets (a dataset project's tokenizer); a package not
installed; data, files or the network that this machine lacks; or other. 'other' is where our bugs show:
each is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from typing import Any

# Runs under the reference: prints {project_dir: {"configs": {name: {"yaml": ..., "graph": ...} | {"error": ...}}}}.
_REFERENCE_WORKER = r'''
import json, os, sys
from forgather.config import ConfigEnvironment
from forgather.latent import CallableNode, FactoryNode, MetaNode, Undefined, VarNode
try:  # renamed in the reference after f92f8b8
    from forgather.latent import PartialNode
except ImportError:
    from forgather.latent import LambdaNode as PartialNode
from forgather.meta_config import MetaConfig, preprocessor_globals

KINDS = ((MetaNode, "meta"), (PartialNode, "partial"), (FactoryNode, "factory"), (CallableNode, "singleton"))
COLLECTIONS = {"named_dict": "dict", "named_list": "list", "named_tuple": "tuple"}


def normal(value, seen):
    if isinstance(value, (list, tuple)):
        return [normal(v, seen) for v in value]
    if isinstance(value, dict):
        return {str(k): normal(v, seen) for k, v in value.items()}
    if isinstance(value, VarNode):
        default = "<undefined>" if value.value is Undefined else normal(value.value, seen)
        return {"var": value.constructor, "default": default}
    if isinstance(value, CallableNode):
        if id(value) in seen:
            return {"ref": seen[id(value)]}
        seen[id(value)] = len(seen)
        name = getattr(value, "_identity", None)
        collection = COLLECTIONS.get(value.constructor)
        if collection and not value.latent_args and not value.submodule_searchpath:
            if collection == "dict" and not value.args:
                return {collection: normal(value.kwargs, seen), "name": name}
            if collection != "dict" and not value.kwargs:
                return {collection: normal(list(value.args[0]) if len(value.args) == 1 and isinstance(value.args[0], (list, tuple)) else list(value.args), seen), "name": name}
        kind = next(k for t, k in KINDS if isinstance(value, t))
        return {
            "call": kind, "target": value.constructor, "name": name,
            "args": normal(list(value.args), seen), "kwargs": normal(value.kwargs, seen),
            "latent_args": normal(value.latent_args, seen), "searchpath": normal(value.submodule_searchpath, seen) or None,
        }
    if isinstance(value, float) and value != value:
        return "nan"
    return value


out = {}
for project_dir in json.load(sys.stdin):
    entry = out[project_dir] = {"configs": {}}
    try:
        meta = MetaConfig(project_dir)
        names = sorted({name for name, _ in meta.find_templates(meta.config_prefix)})
    except Exception as error:
        entry["error"] = f"{type(error).__name__}: {error}"
        continue
    for name in names:
        try:
            env = ConfigEnvironment(searchpath=meta.searchpath, global_vars=preprocessor_globals(project_dir, meta.workspace_root))
            text = env.preprocess(meta.config_path(name))
        except Exception as error:
            entry["configs"][name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        result = {"yaml": str(text)}
        try:
            graph = env.load_from_ppstring(text).config
            seen = {}
            result["graph"] = {k: normal(v, seen) for k, v in graph.items()}
        except Exception as error:
            result["graph_error"] = f"{type(error).__name__}: {error}".split("\n")[0]
        entry["configs"][name] = result
json.dump(out, sys.stdout)
'''

_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d[:-]\d\d[:-]\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?")  # its zone too: naive in older references


def comparable_yaml(text: str) -> list[str]:
    """The lines that carry meaning: no blank or comment lines, no trailing spaces, time stamps masked."""
    lines = (_TIME.sub("<time>", line.rstrip()) for line in text.split("\n"))
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def normal_graph(graph: Any) -> dict[str, Any]:
    """Our graph in the worker's normal form (targets only: the reference drops '.' keys too)."""
    from forgather.graph.nodes import MISSING, CallNode, VarNode

    seen: dict[int, int] = {}

    def normal(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [normal(v) for v in value]
        if isinstance(value, dict):
            return {str(k): normal(v) for k, v in value.items()}
        if isinstance(value, VarNode):
            return {"var": value.name, "default": "<undefined>" if value.default is MISSING else normal(value.default)}
        if isinstance(value, CallNode):
            if id(value) in seen:
                return {"ref": seen[id(value)]}
            seen[id(value)] = len(seen)
            plain = value.kind == "singleton" and value.latent_args is None and value.searchpath is None and not value.kwargs
            if plain and value.target in ("dict", "list", "tuple") and len(value.args) == 1:
                content = value.args[0]
                if isinstance(content, dict) and value.target == "dict" or isinstance(content, (list, tuple)) and value.target != "dict":
                    return {value.target: normal(content), "name": value.name}
            return {
                "call": value.kind, "target": value.target, "name": value.name,
                "args": normal(value.args), "kwargs": normal(value.kwargs),
                "latent_args": normal(value.latent_args), "searchpath": normal(value.searchpath) or None,
            }
        if isinstance(value, float) and value != value:
            return "nan"
        return value

    return {key: normal(graph.nodes[key]) for key in graph.targets}


def _drop_names_the_reference_lacks(ours: Any, theirs: Any) -> Any:
    """`ours` without the node names the reference does not have. The reference reads `!dict@name` (no
    colon) as unnamed; we name the node, which changes no object."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return {k: (None if k == "name" and theirs.get(k) is None else _drop_names_the_reference_lacks(v, theirs.get(k))) for k, v in ours.items()}
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [_drop_names_the_reference_lacks(a, b) for a, b in zip(ours, theirs)]
    return ours


def _mask_times(value: Any) -> Any:
    """Time stamps masked in every string (the two sides render seconds apart: run directories, dates)."""
    if isinstance(value, dict):
        return {k: _mask_times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_times(v) for v in value]
    return _TIME.sub("<time>", value) if isinstance(value, str) else value


def same_graph(graph: Any, reference: dict[str, Any]) -> bool:
    reference = _mask_times(reference)
    return _drop_names_the_reference_lacks(_mask_times(normal_graph(graph)), reference) == reference


def run_reference(checkout: str, project_dirs: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.path.join(checkout, "src")}
    # -P: the current directory (which may hold our own `forgather` package) is not put on sys.path.
    done = subprocess.run(
        [sys.executable, "-P", "-c", _REFERENCE_WORKER], input=json.dumps(project_dirs), env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"the reference worker failed:\n{done.stderr}")
    return json.loads(done.stdout)


def first_difference(ours: list[str], theirs: list[str]) -> str:
    for number, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"meaningful line {number + 1}: ours {a.strip()!r} / reference {b.strip()!r}"
    return f"ours has {len(ours)} meaningful lines, the reference {len(theirs)}"


def compare(checkout: str) -> dict[str, Any]:
    from forgather.graph import generate_code, load_graph, to_config
    from forgather.project import Project, project_dirs

    directories = project_dirs(checkout, recursive=True)
    reference = run_reference(checkout, directories)
    counts: Counter = Counter()
    details: dict[str, dict[str, Any]] = {}
    for directory in directories:
        ref_project = reference[directory]
        try:
            project = Project.load(directory)
        except Exception as error:
            project = None
            meta_error = str(error).split("\n")[0]
        for name, ref in ref_project["configs"].items():
            key = f"{os.path.relpath(directory, checkout)}:{name}"
            row: dict[str, Any] = {}
            details[key] = row
            if "error" in ref:
                counts["reference fails"] += 1
                row["reference error"] = ref["error"][:200]
                continue
            counts["configs"] += 1
            if "graph" in ref:
                try:
                    ref_graph = load_graph(ref["yaml"])
                    row["graph of ref"] = same_graph(ref_graph, ref["graph"])
                    generate_code(to_config(ref_graph).config, base_dir=os.path.join(directory, "model_src"))
                    counts["config+code of ref"] += 1
                except Exception as error:
                    row["graph of ref error"] = str(error).split("\n")[0]
            counts["graph of ref"] += bool(row.get("graph of ref"))
            if project is None:
                row["ours"] = f"meta: {meta_error}"
                counts["meta fails"] += 1
                continue
            try:
                loaded = project.load_config(name)
                text = loaded.text
            except Exception as error:
                row["ours"] = f"render: {str(error).split(chr(10))[0]}"
                counts["render fails"] += 1
                continue
            counts["loads"] += 1
            ours_yaml, ref_yaml = comparable_yaml(text), comparable_yaml(ref["yaml"])
            row["same YAML"] = ours_yaml == ref_yaml
            if not row["same YAML"]:
                row["yaml difference"] = first_difference(ours_yaml, ref_yaml)
            try:
                graph = loaded.graph
                counts["graph loads"] += 1
                row["same graph"] = "graph" in ref and same_graph(graph, ref["graph"])
                loaded.code()
                counts["config+code"] += 1
            except Exception as error:
                row["graph error"] = str(error).split("\n")[0]
            for label in ("same YAML", "same graph"):
                counts[label] += bool(row.get(label))
    return {"counts": dict(counts), "configs": details}


_CONSTRUCT_WORKER = r'''
import json, os, sys, warnings
warnings.simplefilter("ignore")
from forgather.project import Project
loaded = Project.load(sys.argv[1]).load_config(sys.argv[2])
out = {}
for target in loaded.graph.targets:
    try:
        loaded.construct(target)
        out[target] = "built"
    except BaseException as error:
        out[target] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
'''

# (kind, a pattern of the error's text), first match wins.
_CONSTRUCT_KINDS = (
    ("reference library", re.compile(r"is (the reference Forgather's library|a module of the reference Forgather)")),
    ("!var set by its caller", re.compile(r"no value given for ")),
    ("package not installed", re.compile(r"No module named|is the package that provides")),
    ("data, files or network", re.compile(
        r"raised (OSError|ConnectionError|FileNotFoundError|HFValidationError|LocalEntryNotFoundError|"
        r"DatasetNotFoundError|OfflineModeIsEnabled)|no Python file at|couldn't connect|OfflineModeIsEnabled")),
)


def construct_survey(checkout: str, configs: list[str], timeout: float) -> tuple[Counter, list[str]]:
    """Build every target of each 'project:config' with us; (targets per kind, the 'other' errors)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    kinds: Counter = Counter()
    others: list[str] = []
    for key in configs:
        project, config = key.split(":", 1)
        directory = os.path.join(checkout, project)
        try:
            done = subprocess.run([sys.executable, "-c", _CONSTRUCT_WORKER, directory, config], capture_output=True,
                                  text=True, timeout=timeout, cwd=directory, env=env)
            results = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"(load)": done.stderr[-300:]}
        except subprocess.TimeoutExpired:
            results = {"(all)": f"timed out after {timeout:.0f} s"}
        for target, outcome in results.items():
            if outcome == "built":
                kinds["built"] += 1
                continue
            kind = next((name for name, pattern in _CONSTRUCT_KINDS if pattern.search(outcome)), "other")
            kinds[kind] += 1
            if kind == "other":
                others.append(f"{key} {target}: {outcome.splitlines()[0][:400]}")
    return kinds, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of the reference Forgather (jdinalt/forgather)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every config that differs, and why")
    parser.add_argument("--json", help="write the per-config results here")
    parser.add_argument("--construct", action="store_true", help="also build every target with us and sort the failures")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for one config's construction (--construct)")
    args = parser.parse_args()
    result = compare(os.path.abspath(args.checkout))
    if args.verbose:
        for key, row in result["configs"].items():
            if not (row.get("same YAML") and row.get("same graph")):
                print(f"{key}: {json.dumps(row)}")
    counts = result["counts"]
    total = counts.get("configs", 0)
    print(f"projects: {len({k.split(':')[0] for k in result['configs']})}, configs the reference renders: {total}"
          f" (and {counts.get('reference fails', 0)} it cannot)")
    labels = ("loads", "same YAML", "graph loads", "same graph", "config+code", "graph of ref", "config+code of ref", "meta fails", "render fails")
    for label in labels:
        print(f"  {label:<18} {counts.get(label, 0):>4} / {total}")
    if args.construct:
        loading = [key for key, row in result["configs"].items() if "reference error" not in row and "ours" not in row]
        kinds, others = construct_survey(os.path.abspath(args.checkout), loading, args.timeout)
        result["construct"] = {"targets": dict(kinds), "other": others}
        print(f"targets of the {len(loading)} configs that load, built with us:")
        for kind in ("built", *(name for name, _ in _CONSTRUCT_KINDS), "other"):
            print(f"  {kind:<24} {kinds.get(kind, 0):>5}")
        for line in others:
            print(f"  other: {line}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
