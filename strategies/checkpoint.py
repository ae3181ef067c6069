"""Sharded checkpoints of a pipelined model: read back by each rank, or into one whole model.

`PipelineParallelStrategy` saves a directory through torch.distributed.checkpoint, written under a hidden name
beside the target and renamed over it (`swap_into_place`), so a crash never leaves a half-written checkpoint
where a whole one was. Each rank writes the
state of its stages under the whole model's key names (`state_dict` holds the LightningModule's weights,
`optimizer_<i>` the optimizer states keyed by parameter name, `meta.pt` the rest of Lightning's checkpoint;
a tied head that two ranks hold is written once; the optimizer states are flattened (`optimizer_state`): in
torch's nested form, the list of param groups, each naming its parameters, is one key that every rank writes
with its own parameters, and only one rank's is kept). `load_sharded(DIR, module, optimizers)` reads into a
module whatever keys it holds: a rank its share when resuming (`trainer.fit(ckpt_path=DIR)`), or a whole,
unpipelined module in a single process, no process group needed, through `load_sharded_checkpoint(DIR,
module)` (the LightningModule, e.g. `CausalLMModule`, or anything with the same state_dict keys). Resuming
needs the optimizer states: a checkpoint saved without them is refused, saying how to start from its weights.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer


def load_sharded(path: str | os.PathLike, module: nn.Module, optimizers: Sequence[Optimizer] = (),
                 strict: bool = True) -> None:
    """Fill `module` (and the states of `optimizers` over its parameters) from a sharded checkpoint."""
    checkpoint_id = os.fspath(path)
    single_process = not dist.is_initialized()
    state = {"state_dict": module.state_dict()}
    with warnings.catch_warnings():
        # torch warns that it assumes a single process without a process group: that is the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint_id, no_dist=single_process)
    module.load_state_dict(state["state_dict"], strict=strict)
    saved = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata if optimizers else {}
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        if not any(name.startswith(f"{key}.") for name in saved):
            raise ValueError(
                f"checkpoint {checkpoint_id} holds no state of optimizer {index} (saved with "
                "ModelCheckpoint(save_weights_only=True)?), so training cannot resume from it; to start from its "
                "weights, load them into the module before fit (forgather.strategies.load_sharded_checkpoint) "
                "and fit without ckpt_path"
            )
        flat = f"{key}.param_groups.0.params" not in saved  # nested: a checkpoint written before flattening
        loaded = {key: optimizer_state(module, optimizer, flat)}
        dcp.load(loaded, checkpoint_id=checkpoint_id, no_dist=single_process)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=loaded[key],
                                 options=StateDictOptions(flatten_optimizer_state_dict=flat))


def optimizer_state(module: nn.Module, optimizer: Optimizer, flat: bool = True) -> dict[str, Any]:
    """The state of `optimizer` over `module`'s parameters, on the CPU, keyed by parameter name throughout (`flat`:
    the param groups' settings too, one key a parameter), so that ranks holding different stages write
    different keys and each reads back those of the parameters it holds, under any stage layout."""
    options = StateDictOptions(flatten_optimizer_state_dict=flat, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_sharded_checkpoint(path: str | os.PathLike, module: nn.Module, strict: bool = True) -> nn.Module:
    """Load the weights of a sharded checkpoint directory into a whole `module` (in place); returns it."""
    load_sharded(path, module, strict=strict)
    return module


def swap_into_place(staging: Path, path: Path) -> None:
    """Rename the finished `staging` directory to `path`, replacing what was there (file or directory)."""
    previous = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, previous)
    os.replace(staging, path)
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink(missing_ok=True)
