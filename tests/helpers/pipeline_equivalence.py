"""gloo processes pipeline tiny models; each rank writes `<out>/<case>-rank<R>.json`.

A case is a schedule name (a tied-embedding CausalLM, 2 stages a rank for multi-stage schedules), "untied"
(1F1B, separate head), "sequential" (1F1B, an nn.Sequential cut by split points) or "replicas" (1F1B on a
2 x 2 mesh: 2 stages x 2 data-parallel replicas, each replica half of the batch). Each compares the
pipelined loss (forward only, then forward and backward) and this rank's gradients with one process running
the whole model (packed rows, uneven padding). Run by tests/test_strategy_pipeline.py, once a rank with
torchrun's environment (helpers/ranks.py, or `torchrun --nproc-per-node 2`); arguments: the output directory
and the cases.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from forgather.loss.naive import NaiveLoss
from forgather.strategies.pipeline_runtime import PipelineRuntime, pipeline_mesh

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_models import causal_lm, packed_batch, sequential_model  # noqa: E402


def causal_lm_reference(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"])
    return NaiveLoss()(hidden, model.lm_head_weight, batch["labels"])


def half(batch: dict, replica: int) -> dict:
    rows = batch["input_ids"].shape[0] // 2
    return {key: value[replica * rows : (replica + 1) * rows] for key, value in batch.items()}


def compare(runtime: PipelineRuntime, model: nn.Module, batch, reference_model: nn.Module, reference_loss) -> dict:
    evaluated = float(runtime.evaluate(batch))
    loss = float(runtime.step(batch))
    ref_grads = {name: p.grad for name, p in reference_model.named_parameters()}
    errors = {name: float((p.grad - ref_grads[name]).abs().max()) for name, p in model.named_parameters()}
    return {"loss": loss, "evaluated_loss": evaluated, "reference_loss": reference_loss.item(),
            "max_grad_error": max(errors.values()), "parameters": sorted(errors),
            "grad_norm": float(runtime.grad_norm()),
            "reference_grad_norm": float(torch.nn.utils.get_total_norm(list(ref_grads.values())))}


def causal_lm_case(schedule: str, tie_embeddings: bool = True) -> dict:
    batch, reference = packed_batch(), causal_lm(tie_embeddings)
    reference_loss = causal_lm_reference(reference, batch)
    reference_loss.backward()
    model = causal_lm(tie_embeddings)
    mesh = pipeline_mesh("cpu", dist.get_world_size())
    runtime = PipelineRuntime(model, NaiveLoss(), mesh, torch.device("cpu"), schedule=schedule, n_microbatches=4)
    return compare(runtime, model, batch, reference, reference_loss)


def sequential_case() -> dict:
    generator = torch.Generator().manual_seed(2)
    inputs, target = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    reference = sequential_model()
    reference_loss = nn.functional.mse_loss(reference(inputs), target)
    reference_loss.backward()
    model = sequential_model()
    runtime = PipelineRuntime(model, nn.MSELoss(), pipeline_mesh("cpu", dist.get_world_size()), torch.device("cpu"),
                              schedule="1F1B", n_microbatches=4, split_points=[3])
    return compare(runtime, model, (inputs, target), reference, reference_loss)


def replicas_case() -> dict:
    """2 stages x 2 replicas: gradients are the mean over replicas of each half-batch's gradients."""
    batch = packed_batch()
    reference = causal_lm()
    halves = [causal_lm_reference(reference, half(batch, replica)) for replica in (0, 1)]
    reference_loss = (halves[0] + halves[1]) / 2
    reference_loss.backward()
    model = causal_lm()
    mesh = pipeline_mesh("cpu", 2, 2)
    runtime = PipelineRuntime(model, NaiveLoss(), mesh, torch.device("cpu"), schedule="1F1B", n_microbatches=2)
    replica = mesh["dp"].get_local_rank()
    return compare(runtime, model, half(batch, replica), reference, halves[replica])


CASES = {"untied": lambda: causal_lm_case("1F1B", tie_embeddings=False), "sequential": sequential_case,
         "replicas": replicas_case}


def main(out_dir: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for case in cases:
        result = CASES[case]() if case in CASES else causal_lm_case(case)
        Path(out_dir, f"{case}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
