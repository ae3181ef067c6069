"""Two CPU processes (gloo) shard a small model with FSDP2 (`fully_shard`) and step it with forgather's AdamW;
each writes `<out>/rank<R>.json` with the largest difference between the sharded model's full parameters and an
unsharded copy stepped the same way, and whether a bf16 sharded model's weights moved. Run by
tests/test_optim_adamw.py; argument: the output directory (it also holds the rendezvous file).
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

from forgather.optim import AdamW

WORLD_SIZE = 2


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).to(dtype)


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model: nn.Module, steps: int = 3) -> None:
    optimizer = AdamW(model.parameters(), lr=1e-2)
    tokens = torch.arange(12).reshape(2, 6)
    for _ in range(steps):
        model(tokens).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def worker(rank: int, out_dir: str) -> None:
    init_file = Path(out_dir, "rendezvous").resolve()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    sharded, reference = shard(make_model(), mesh), make_model()
    train(sharded)
    train(reference)
    difference = max(
        float((a.full_tensor() - b).abs().max()) for a, b in zip(sharded.parameters(), reference.parameters())
    )
    bf16 = shard(make_model(torch.bfloat16), mesh)
    before = [p.full_tensor().clone() for p in bf16.parameters()]
    train(bf16)
    moved = all(not torch.equal(a, p.full_tensor()) for a, p in zip(before, bf16.parameters()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"difference": difference, "bf16_moved": moved}))
    dist.destroy_process_group()


if __name__ == "__main__":
    # fork: the children share the already-imported torch instead of importing it again (CPU only).
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE, start_method="fork")
