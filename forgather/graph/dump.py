"""Node graph -> YAML in Forgather's own tag syntax (what `forgather graph --format yaml` prints).

The output loads back into an equal graph: call nodes keep their kind, target and name; a node reached
twice is written once with an anchor and aliased after, so sharing survives. As in the reference Forgather, a
named node's anchor is its name (`&box`, `*box`), and a multi-line string is a literal block (`|`). Latent args and the
submodule search path are written under their reserved keys, positional arguments then as `argN` keys.
"""

from __future__ import annotations

import re

import yaml

from forgather.graph.nodes import LATENT_ARGS, MISSING, SEARCHPATH, CallNode, Graph, VarNode
from forgather.graph.yaml_loader import _POSITIONAL_KEY

_TAGS = {"singleton": "!singleton:", "factory": "!factory:", "partial": "!partial:", "meta": "!meta:"}


_ANCHOR = re.compile(r"[A-Za-z0-9_-]+")  # what a YAML anchor may be spelled with (PyYAML's emitter checks it)


class _GraphDumper(yaml.SafeDumper):
    def generate_anchor(self, node: yaml.Node) -> str:
        used = set(self.anchors.values())
        name = (node.tag or "").partition("@")[2]
        if _ANCHOR.fullmatch(name) and name not in used:
            return name
        anchor = super().generate_anchor(node)
        while anchor in used:  # a node may be named like a generated anchor (id001)
            anchor = super().generate_anchor(node)
        return anchor


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


def _represent_call(dumper: yaml.SafeDumper, node: CallNode) -> yaml.Node:
    tag = _TAGS[node.kind] + node.target + (f"@{node.name}" if node.name else "")
    reserved = {key: value for key, value in ((LATENT_ARGS, node.latent_args), (SEARCHPATH, node.searchpath)) if value is not None}
    if any(key in ("args", "kwargs") or _POSITIONAL_KEY.match(str(key)) for key in node.kwargs):
        # A keyword named like the argument forms' own keys would read back as them: spell both out.
        return dumper.represent_mapping(tag, {"args": node.args, "kwargs": {**node.kwargs, **reserved}})
    if reserved:
        positional = {f"arg{i}": arg for i, arg in enumerate(node.args)}
        return dumper.represent_mapping(tag, {**positional, **node.kwargs, **reserved})
    if node.args and node.kwargs:
        return dumper.represent_mapping(tag, {"args": node.args, "kwargs": node.kwargs})
    if node.kwargs:
        return dumper.represent_mapping(tag, node.kwargs)
    return dumper.represent_sequence(tag, node.args)


def _represent_var(dumper: yaml.SafeDumper, node: VarNode) -> yaml.Node:
    if node.default is MISSING:
        return dumper.represent_scalar("!var", node.name)
    return dumper.represent_mapping("!var", {"name": node.name, "default": node.default})


_GraphDumper.add_representer(str, _represent_str)
_GraphDumper.add_representer(CallNode, _represent_call)
_GraphDumper.add_representer(VarNode, _represent_var)


def dump_graph(graph: Graph) -> str:
    return yaml.dump(graph.nodes, Dumper=_GraphDumper, sort_keys=False, default_flow_style=False, width=100,
                     allow_unicode=True)
