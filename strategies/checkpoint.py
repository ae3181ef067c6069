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
meta.pt carries FORMAT_KEY, which tells ours from the sharded directories of Lightning's FSDPStrategy and
ModelParallelStrategy (`foreign_checkpoint`; ours from before it by their layout). A rank whose stages are all
frozen has an optimizer over no parameters: it writes no keys and reads back another rank's group settings.
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
        if not _holds_parameters(optimizer):
            _load_settings_of_another_rank(checkpoint_id, optimizer, key, saved if flat else {}, single_process)
            continue
        loaded = {key: _saved_settings(optimizer_state(module, optimizer, flat), optimizer, key, saved)
                  if flat else optimizer_state(module, optimizer, flat)}
        dcp.load(loaded, checkpoint_id=checkpoint_id, no_dist=single_process)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=loaded[key],
                                 options=StateDictOptions(flatten_optimizer_state_dict=flat))


# Written into meta.pt by PipelineParallelStrategy.save_checkpoint: Lightning's FSDPStrategy and
# ModelParallelStrategy write a torch.distributed.checkpoint directory with a meta.pt too.
FORMAT_KEY, FORMAT = "sharded_format", "forgather.pipeline/1"


def foreign_checkpoint(path: str | os.PathLike, meta: dict[str, Any]) -> str | None:
    """What wrote the sharded checkpoint directory `path` (whose meta.pt holds `meta`) if not
    PipelineParallelStrategy (None: ours). Ours carry FORMAT_KEY; those written before it are told from the
    others by their layout: FSDPStrategy keeps the weights under "model", not "state_dict"; ModelParallelStrategy
    (FSDP2, tensor parallel) cuts a weight into chunks of several ranks, where ours writes each whole, once."""
    if meta.get(FORMAT_KEY) == FORMAT:
        return None
    if FORMAT_KEY in meta:
        return f"a sharded checkpoint of format {meta[FORMAT_KEY]!r}, not {FORMAT!r}"
    saved = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    if not any(key.startswith("state_dict.") for key in saved) and any(key.startswith("model.") for key in saved):
        return "an FSDPStrategy sharded checkpoint (its weights under 'model')"
    if any(len(getattr(value, "chunks", ())) > 1 for value in saved.values()):
        return ("a checkpoint of a strategy that shards each weight across ranks (ModelParallelStrategy: FSDP2, "
                "tensor parallel)")
    return None


def _load_settings_of_another_rank(checkpoint_id: str, optimizer: Optimizer, key: str, saved: Any,
                                   single_process: bool) -> None:
    """An optimizer over no parameters (a rank of frozen stages) has no keys of its own (`optimizer_state`): its
    groups take the settings of a parameter's group that another rank saved (the learning rate its scheduler
    goes on from, which train/lr logs). dcp.load is a collective, so it is called here too."""
    prefix = f"{key}.param_groups."
    some = next((name.rsplit(".", 1)[0] for name in saved if name.startswith(prefix)), None)
    settings = {name.rsplit(".", 1)[1]: None for name in saved if some and name.rsplit(".", 1)[0] == some}
    settings.pop("params", None)
    loaded = {f"{some}.{setting}": value for setting, value in settings.items()}
    dcp.load(loaded, checkpoint_id=checkpoint_id, no_dist=single_process)
    for group in optimizer.param_groups:
        group.update({setting: loaded[f"{some}.{setting}"] for setting in settings})


def _saved_settings(state: dict[str, Any], optimizer: Optimizer, key: str, saved: Any) -> dict[str, Any]:
    """The flat `state` to read back, less the param groups' settings the checkpoint lacks, which are taken out
    of the optimizer's groups too: they were added since the save (the LR finder's `initial_lr`, its schedule's),
    and the groups read back are the saved ones, as torch's own `Optimizer.load_state_dict` gives."""
    groups = [name for name in state if name.startswith("param_groups.")]
    added = {name.rsplit(".", 1)[1] for name in groups if f"{key}.{name}" not in saved}
    for group in optimizer.param_groups:
        for setting in added:
            group.pop(setting, None)
    return {name: value for name, value in state.items() if name not in groups or name.rsplit(".", 1)[1] not in added}


def optimizer_state(module: nn.Module, optimizer: Optimizer, flat: bool = True) -> dict[str, Any]:
    """The state of `optimizer` over `module`'s parameters, on the CPU, keyed by parameter name throughout (`flat`:
    the param groups' settings too, one key a parameter), so that ranks holding different stages write
    different keys and each reads back those of the parameters it holds, under any stage layout."""
    if not _holds_parameters(optimizer):
        return {}  # a rank of frozen stages only: torch refuses to describe an optimizer over nothing
    options = StateDictOptions(flatten_optimizer_state_dict=flat, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def _holds_parameters(optimizer: Optimizer) -> bool:
    return any(group["params"] for group in optimizer.param_groups)


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
