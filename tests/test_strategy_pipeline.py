"""Pipeline parallelism on the CPU: stage cuts, placements, and a pipelined model's loss and gradients
against one process running the whole model (gloo processes: every schedule, tied and untied heads, an
nn.Sequential, and pipeline x data parallelism)."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgather.loss.naive import NaiveLoss
from forgather.strategies.pipeline_split import balanced_split_points, stage_indices, stage_layer_ranges, stage_rank
from forgather.strategies.pipeline_stages import CausalLMStage, prune_to, stages_for

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pipeline_models import causal_lm, packed_batch  # noqa: E402
from ranks import start_ranks, wait_all  # noqa: E402

HELPERS = Path(__file__).parent / "helpers"
SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
CASES = ["untied", "sequential"]


def test_importing_the_package_does_not_import_torch():
    code = "import sys, forgather.strategies; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# Stage cuts and placements


def test_explicit_split_points_start_each_later_stage():
    assert stage_layer_ranges(6, 3, [2, 5]) == [range(0, 2), range(2, 5), range(5, 6)]


def test_split_points_of_the_wrong_count_are_refused_with_the_count_needed():
    with pytest.raises(ValueError, match="give 1 layer indices"):
        stage_layer_ranges(4, 2, [1, 2])


def test_an_empty_stage_is_refused():
    with pytest.raises(ValueError, match="increase strictly"):
        stage_layer_ranges(4, 3, [2, 2])


def test_balanced_split_by_layer_count_is_even():
    assert balanced_split_points(8, 4) == [2, 4, 6]


def test_balanced_split_gives_the_last_stage_fewer_layers_for_a_costly_head():
    assert balanced_split_points(16, 2, head_cost=4.0) == [10]


def test_loop_placement_deals_stages_round_robin():
    assert [stage_indices(rank, 2, 2, "loop") for rank in (0, 1)] == [[0, 2], [1, 3]]


def test_v_placement_folds_the_stages_back():
    assert [stage_indices(rank, 2, 2, "v") for rank in (0, 1)] == [[0, 3], [1, 2]]
    assert stage_rank(3, 2, 2, "v") == 0


# Stage modules


def test_stages_chained_equal_the_whole_model():
    model, batch = causal_lm(), packed_batch()
    expected = model.hidden_states(batch["input_ids"], batch["position_ids"])
    ranges = stage_layer_ranges(len(model.layers), 2, [1])
    first, last = CausalLMStage(model, ranges[0], True, False), CausalLMStage(model, ranges[1], False, True)
    hidden = last(first(batch["input_ids"], batch["position_ids"]), batch["position_ids"])
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


def _counted(forward, calls: list, *args, **kwargs):
    calls.append(1)
    return forward(*args, **kwargs)


def test_stages_recompute_layers_when_the_model_checkpoints_activations():
    batch = packed_batch()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = causal_lm()
        model.activation_checkpointing = checkpointing
        feedforward, forwards = model.layers[3].feedforward, []
        # A wrapped forward, not a hook: torch does not rerun forward hooks when it recomputes.
        feedforward.forward = functools.partial(_counted, feedforward.forward, forwards)
        first, last = CausalLMStage(model, range(0, 2), True, False), CausalLMStage(model, range(2, 4), False, True)
        last(first(batch["input_ids"], batch["position_ids"]), batch["position_ids"]).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
        calls.append(len(forwards))
    assert calls == [1, 2]  # recomputed in backward
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_pruning_keeps_the_state_dict_keys_of_the_kept_stage():
    model = causal_lm(tie_embeddings=False)
    whole = set(model.state_dict())
    stage = stages_for(model, NaiveLoss()).stage(range(2, 4), is_first=False, is_last=True)
    prune_to(model, [stage])
    kept = set(model.state_dict())
    assert kept < whole
    assert {key.split(".")[0] for key in kept} == {"layers", "norm", "lm_head"}
    assert {key.split(".")[1] for key in kept if key.startswith("layers")} == {"2", "3"}


def test_a_module_that_is_neither_causal_lm_nor_sequential_is_refused():
    with pytest.raises(TypeError, match="cannot cut a Linear"):
        stages_for(torch.nn.Linear(2, 2), NaiveLoss())


# Two processes: every schedule, an untied head, an nn.Sequential; four processes: 2 stages x 2 replicas


def _equivalence(out: Path, world_size: int, *cases: str) -> Path:
    wait_all(start_ranks([str(HELPERS / "pipeline_equivalence.py"), str(out), *cases], world_size))
    return out


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory) -> Path:
    return _equivalence(tmp_path_factory.mktemp("pipeline"), 2, *SCHEDULES, *CASES)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> Path:
    return _equivalence(tmp_path_factory.mktemp("replicas"), 4, "replicas")


def _results(out: Path, case: str, world_size: int = 2) -> list[dict]:
    return [json.loads(Path(out, f"{case}-rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.mark.parametrize("case", SCHEDULES + CASES)
def test_pipelined_loss_equals_the_single_process_loss(pipelined, case):
    for result in _results(pipelined, case):
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)


@pytest.mark.parametrize("case", SCHEDULES + CASES)
def test_forward_only_evaluation_gives_the_single_process_loss(pipelined, case):
    for result in _results(pipelined, case):
        assert result["evaluated_loss"] == pytest.approx(result["reference_loss"], rel=1e-6)


@pytest.mark.parametrize("case", SCHEDULES + CASES)
def test_pipelined_gradients_equal_the_single_process_gradients(pipelined, case):
    for result in _results(pipelined, case):
        assert result["max_grad_error"] < 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_ranks_of_a_pipeline_hold_the_whole_model(pipelined, schedule):
    results = _results(pipelined, schedule)
    covered = set(results[0]["parameters"]) | set(results[1]["parameters"])
    assert covered == {name for name, _ in causal_lm().named_parameters()}


@pytest.mark.parametrize("case", SCHEDULES + CASES)
def test_pipelined_grad_norm_is_the_whole_models(pipelined, case):
    for result in _results(pipelined, case):
        assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-5)


@pytest.mark.slow  # four processes on the CPU
def test_pipeline_replicas_average_their_gradients(replicated):
    # Each replica's loss is its half-batch's; the gradients are the mean over the halves on every rank.
    for result in _results(replicated, "replicas", world_size=4):
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["max_grad_error"] < 1e-6
        assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-5)
