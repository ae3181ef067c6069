"""Two gloo processes pipeline a tiny CausalLM with each schedule; each writes `<out>/<schedule>-rank<R>.json`.

For every schedule the pipelined loss and this rank's gradients are compared with one process running the
whole model on the same batch (packed rows, uneven padding). Run by tests/test_strategy_pipeline.py;
arguments: the output directory (it holds the rendezvous file too) and the schedule names.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forgather.loss.naive import NaiveLoss
from forgather.strategies.pipeline_runtime import PipelineRuntime, pipeline_mesh

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_models import causal_lm, packed_batch  # noqa: E402

WORLD_SIZE = 2


def reference_grads(batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model, loss = causal_lm(), NaiveLoss()
    value = loss(model.hidden_states(batch["input_ids"], batch["position_ids"]), model.lm_head_weight, batch["labels"])
    value.backward()
    return value.item(), {name: p.grad for name, p in model.named_parameters()}


def compare(schedule: str, batch: dict, reference: tuple[float, dict[str, torch.Tensor]]) -> dict:
    model = causal_lm()
    runtime = PipelineRuntime(model, NaiveLoss(), pipeline_mesh("cpu", WORLD_SIZE), torch.device("cpu"),
                              schedule=schedule, n_microbatches=4)
    loss = float(runtime.step(batch))
    ref_loss, ref_grads = reference
    errors = {name: float((p.grad - ref_grads[name]).abs().max()) for name, p in model.named_parameters()}
    return {"loss": loss, "reference_loss": ref_loss, "max_grad_error": max(errors.values()),
            "parameters": sorted(errors), "grad_norm": float(runtime.grad_norm()),
            "reference_grad_norm": float(torch.nn.utils.get_total_norm(list(ref_grads.values())))}


def worker(rank: int, out_dir: str, schedules: list[str]) -> None:
    init_file = Path(out_dir, "rendezvous").resolve()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    batch = packed_batch()
    reference = reference_grads(batch)
    for schedule in schedules:
        result = compare(schedule, batch, reference)
        Path(out_dir, f"{schedule}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2:]), nprocs=WORLD_SIZE)
