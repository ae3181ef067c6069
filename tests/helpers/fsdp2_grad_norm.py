"""Two CPU processes (gloo) shard a small model with FSDP2 (`fully_shard`); each writes `<out>/rank<R>.json`
with `total_grad_norm` of the sharded (DTensor) gradients next to the norm of an unsharded copy's gradients.
Run by tests/test_lightning_module.py; argument: the output directory (it also holds the rendezvous file, so
no TCP port can be taken by a neighbour between choosing and binding it).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from forgather.lightning.module import total_grad_norm

WORLD_SIZE = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))


def worker(rank: int, out_dir: str) -> None:
    init_file = Path(out_dir, "rendezvous").resolve()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    sharded, reference = make_model(), make_model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    tokens = torch.arange(12).reshape(2, 6)
    for model in (sharded, reference):
        model(tokens).square().mean().backward()
    result = {
        "rank": rank,
        "dtensor_grads": all(type(p.grad).__name__ == "DTensor" for p in sharded.parameters()),
        "sharded": float(total_grad_norm(sharded.parameters())),
        "reference": float(total_grad_norm(reference.parameters())),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    # fork: the children share the already-imported torch instead of importing it again (CPU only).
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE, start_method="fork")
