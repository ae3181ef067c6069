"""Distributed training strategies for Lightning: `PipelineParallelStrategy` (pipeline.py).

Modules: pipeline_split.py (where stages are cut, which rank runs which), pipeline_stages.py (stage modules
cut from a CausalLM or an nn.Sequential), pipeline_runtime.py (one rank's stages + the torch schedule, no
Lightning), pipeline.py (the Lightning strategy), checkpoint.py (sharded checkpoints into one model).
Names resolve lazily, so importing this package does not import torch or Lightning.
"""

from __future__ import annotations

from forgather.lazy import lazy_exports

_EXPORTS = {
    "PipelineParallelStrategy": "pipeline",
    "PipelineRuntime": "pipeline_runtime",
    "pipeline_mesh": "pipeline_runtime",
    "load_sharded_checkpoint": "checkpoint",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
