"""Audit of PipelineParallelStrategy: a resumed fit of an untied model (whose ranks' optimizer param groups name
different parameters) continues exactly, and a checkpoint in torch's nested optimizer format still resumes; a
weights directory given as ckpt_path gets advice for a directory; a config's list (OmegaConf) is taken as split
points, and a misspelled schedule its name; a second fit of one Trainer trains each rank's stages only after the
first gathered the whole model on rank 0; ranks of a pipeline reading different batches, and an optimizer that
steps inside backward, are refused; a loader that Lightning limits before its short last batch trains.

Run as a script, this file is a rank of the fits below: `python THIS OUT` fits CausalLMModule on one process
with `limit_train_batches` and writes `<out>/steps.json`; `--in-backward` the same with OptimizerInBackward,
which the strategy refuses; `--twice` (two ranks) fits twice with one Trainer, writing
`<out>/twice-rank<R>.json`; `--differing` (two ranks) the same, each rank reading batches of its own (refused).
"""

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pipeline_models import causal_lm, packed_batch, sequential_model  # noqa: E402
from ranks import failed_outputs, start, start_ranks, wait_all  # noqa: E402

TRAIN = Path(__file__).parent / "helpers" / "pipeline_train.py"


# Checkpoints: each rank's optimizer state under its own keys


def _train(out: Path, *args: str) -> Path:
    out.mkdir()
    wait_all(start_ranks([str(TRAIN), str(out), *args], 2))
    return out


@pytest.mark.slow  # two two-process fits, one after the other
def test_a_resumed_fit_of_an_untied_model_under_a_schedule_ends_with_the_uninterrupted_weights(tmp_path):
    # Before: torch's nested optimizer state keeps the param groups as one list, which both ranks wrote under one
    # key; rank 0 read back rank 1's parameter names, lost its groups' settings and failed with KeyError: 'betas'.
    # The warmup makes the learning rate differ at every step, so a group's settings read from the wrong step show.
    common = ("--untied", "--warmup", "5", "--steps", "3")
    uninterrupted = _train(tmp_path / "uninterrupted", *common, "--save-at", "2")
    resumed = _train(tmp_path / "resumed", *common, "--resume", str(uninterrupted / "step2"))
    for rank in (0, 1):
        expected = torch.load(uninterrupted / f"state-rank{rank}.pt")
        actual = torch.load(resumed / f"state-rank{rank}.pt")
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0)


def _stepped(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW with two param groups (no weight decay on the biases), after one step."""
    model = sequential_model(seed)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    optimizer = torch.optim.AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-2)
    model(torch.ones(2, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: as intended
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "nested"])
def test_an_optimizer_state_loads_back_from_either_format(tmp_path, flat):
    """Checkpoints written before the optimizer state was flattened (nested) resume as before."""
    from torch.distributed import checkpoint as dcp

    from forgather.strategies.checkpoint import load_sharded, optimizer_state

    model, optimizer = _stepped()
    for group in optimizer.param_groups:
        group["lr"] = 3e-3  # as a scheduler leaves it
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": optimizer_state(model, optimizer, flat)},
             checkpoint_id=tmp_path, no_dist=True)
    fresh, fresh_optimizer = _stepped(seed=1)
    load_sharded(tmp_path, fresh, [fresh_optimizer])
    assert [group["lr"] for group in fresh_optimizer.param_groups] == [3e-3, 3e-3]
    assert [group["weight_decay"] for group in fresh_optimizer.param_groups] == [1e-2, 0.0]
    for parameter, loaded in zip(model.parameters(), fresh.parameters()):
        for name, value in optimizer.state[parameter].items():
            torch.testing.assert_close(fresh_optimizer.state[loaded][name], value, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resuming_from_a_weights_directory_says_to_load_it_as_one(tmp_path):
    # Before: the advice for a single file, torch.load(path), which cannot read a directory.
    from torch.distributed import checkpoint as dcp

    from forgather.strategies import PipelineParallelStrategy

    dcp.save({"state_dict": sequential_model().state_dict()}, checkpoint_id=tmp_path / "weights", no_dist=True)
    with pytest.raises(ValueError, match=r"weights is not a sharded checkpoint directory .* a torch.distributed."
                                         r"checkpoint directory's weights, load them .*load_sharded_checkpoint\(path, "
                                         r"module\)"):
        PipelineParallelStrategy().load_checkpoint(tmp_path / "weights")


# Arguments


def test_split_points_from_a_config_list_are_taken():
    # Before: Hydra's instantiate hands over an OmegaConf ListConfig, refused as "split_points=[2] ... must be a list".
    from omegaconf import OmegaConf

    from forgather.strategies import PipelineParallelStrategy

    assert PipelineParallelStrategy(split_points=OmegaConf.create([2])).split_points == [2]


def test_a_split_point_given_as_a_module_name_says_to_give_its_index():
    from forgather.strategies.pipeline_split import stage_layer_ranges

    with pytest.raises(ValueError, match=r"split_points=\['layers.2'\] .* N for the stage that starts at layer N, not "
                                         r"a module name such as 'layers.N'"):
        stage_layer_ranges(4, 2, ["layers.2"])


@pytest.mark.parametrize("misspelled, meant", [("looped_bfs", "LoopedBFS"), ("Schedule1F1B", "1F1B"),
                                               ("Interleaved-1F1B", "Interleaved1F1B")])
def test_a_schedule_spelled_another_way_gets_its_name(misspelled, meant):
    # Before: no suggestion for looped_bfs or torch's class name Schedule1F1B; two for Interleaved-1F1B.
    from forgather.strategies import PipelineParallelStrategy

    with pytest.raises(ValueError, match=rf"is not a pipeline schedule; did you mean '{meant}'\? choose one of"):
        PipelineParallelStrategy(schedule=misspelled)


def test_a_string_is_not_taken_for_split_points():
    from forgather.strategies import PipelineParallelStrategy

    with pytest.raises(ValueError, match=r"split_points='2' \(config value `split_points`\) must be a list"):
        PipelineParallelStrategy(split_points="2")


# A second fit of the same Trainer


def test_a_second_fit_after_gathering_the_model_trains_each_ranks_stages_only(tmp_path):
    # Before: rank 0 kept the whole model gathered at the end of the first fit, so the second fit's optimizer
    # held every stage's parameters there (stale copies of the other ranks', written into its checkpoints).
    out = tmp_path / "twice"
    out.mkdir()
    wait_all(start_ranks([__file__, str(out), "--twice"], 2))
    for rank in (0, 1):
        first, second = json.loads((out / f"twice-rank{rank}.json").read_text())
        assert first["optimized"] == second["optimized"] < len(list(causal_lm().parameters()))
        assert second["whole_at_end"] == (rank == 0)  # gathered again


# Every stage reads the same batches


def test_pipeline_ranks_reading_different_batches_are_refused(tmp_path):
    # Before: the first stage embedded one batch and the last scored another's labels, silently.
    out = tmp_path / "differing"
    out.mkdir()
    for output in failed_outputs(start_ranks([__file__, str(out), "--differing"], 2)):  # both ranks, so neither waits for the other
        assert "ValueError: the ranks of a pipeline read different training batches" in output
        assert "keep Lightning's distributed sampler (use_distributed_sampler=True)" in output


# Optimizers


def test_an_optimizer_that_steps_inside_backward_is_refused(tmp_path):
    # Before: the schedule's backward of each microbatch stepped every parameter, 4 steps a batch.
    process = start([__file__, str(tmp_path), "--in-backward"])
    try:
        assert process.wait(timeout=300) != 0
        process.output.seek(0)
        output = process.output.read().decode(errors="replace")
    finally:
        process.output.close()
    assert ("ValueError: OptimizerInBackward steps each parameter inside backward, but PipelineParallelStrategy runs a "
            "backward for every microbatch") in output
    assert "choose an optimizer that steps after backward (config value `optimizer`" in output


# The short last batch


def test_a_loader_limited_before_its_short_last_batch_trains(tmp_path):
    # Before: 10 rows in batches of 4 end each epoch with a 2-row batch, refused before the first step although
    # limit_train_batches=2 stops every epoch before it.
    out = tmp_path / "limited"
    out.mkdir()
    wait_all([start([__file__, str(out)])])
    assert json.loads((out / "steps.json").read_text()) == 4


def fit(out: Path, in_backward: bool = False) -> None:
    """Two epochs of two 4-row batches (limit_train_batches=2, of the loader's three: 4, 4 and 2 rows) on one
    process, with AdamW, or AdamW stepped inside backward (`in_backward`)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss
    from forgather.optim.in_backward import OptimizerInBackward
    from forgather.strategies import PipelineParallelStrategy

    torch.set_num_threads(1)
    pl.seed_everything(0)
    rows = [{key: value[row] for key, value in packed_batch(seed).items()} for seed in (1, 2) for row in range(5)]
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    if in_backward:
        optimizer = functools.partial(OptimizerInBackward, optimizer_factory=optimizer)
    module = CausalLMModule(causal_lm(), NaiveLoss(), optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=PipelineParallelStrategy("1F1B", n_microbatches=4), max_epochs=2,
        limit_train_batches=2, num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(rows, batch_size=4))
    Path(out, "steps.json").write_text(json.dumps(trainer.global_step))


def fit_twice(out: Path, differing: bool = False) -> None:
    """Two pipelined fits of one Trainer (two processes), the second one epoch further; writes what each fit's
    optimizer held and whether the module held the whole model when it ended. `differing`: each rank reads
    batches of its own (the fit fails)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss
    from forgather.strategies import PipelineParallelStrategy

    torch.set_num_threads(1)
    pl.seed_everything(0)
    fits = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            fits.append({"optimized": sum(len(group["params"]) for group in trainer.optimizers[0].param_groups)})

        def on_train_end(self, trainer, module) -> None:  # after the strategy's gathering, which runs first
            fits[-1]["whole_at_end"] = len(list(module.parameters())) == len(list(causal_lm().parameters()))

    module = CausalLMModule(causal_lm(), NaiveLoss(), functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=PipelineParallelStrategy("1F1B", n_microbatches=4), max_epochs=1,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()],
    )
    offset = int(os.environ["RANK"]) if differing else 0
    data = DataLoader([packed_batch(seed + offset) for seed in (1, 2)], batch_size=None)
    trainer.fit(module, data)
    trainer.fit_loop.max_epochs = 2  # Lightning's way to train on
    trainer.fit(module, data)
    Path(out, f"twice-rank{trainer.global_rank}.json").write_text(json.dumps(fits))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--in-backward", action="store_true", help="the same fit with OptimizerInBackward")
    parser.add_argument("--twice", action="store_true", help="fit_twice (two ranks)")
    parser.add_argument("--differing", action="store_true", help="fit_twice, each rank with batches of its own")
    args = parser.parse_args()
    if args.twice or args.differing:
        return fit_twice(args.out, differing=args.differing)
    fit(args.out, in_backward=args.in_backward)


if __name__ == "__main__":
    main()
