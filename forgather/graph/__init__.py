"""Graph stage: YAML with Forgather's tags -> node graph -> OmegaConf config -> objects or Python code.

Torch-free: importing this package imports only PyYAML and OmegaConf.
"""

from forgather.graph.codegen import generate_code
from forgather.graph.config import ConfigResult, to_config
from forgather.graph.construct import ConstructError, construct
from forgather.graph.dump import dump_graph
from forgather.graph.nodes import CallNode, Graph, VarNode
from forgather.graph.yaml_loader import GraphError, GraphWarning, load_graph

__all__ = [
    "CallNode",
    "ConfigResult",
    "ConstructError",
    "Graph",
    "GraphError",
    "GraphWarning",
    "VarNode",
    "construct",
    "dump_graph",
    "generate_code",
    "load_graph",
    "to_config",
]
