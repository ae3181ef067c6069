"""Mistakes and rough edges under PipelineParallelStrategy: wrong arguments are refused when the strategy is
built, with the argument, its config value and what to give; batches whose shape changes (a smaller last
batch) train and validate like one process; a checkpoint resumes under another stage layout; a failing rank
ends the others instead of leaving them waiting.

Run as a script, this file is the rank of the multi-process tests (started by tests/helpers/ranks.py) and
writes `<out>/result-rank<R>.json`: `python THIS OUT --runtime` steps batches of changing shapes through
PipelineRuntime beside the whole model; `python THIS OUT [--devices N] [--rows R ...] [--val-rows R ...]
[--fail-rank R]` fits CausalLMModule on a tiny CausalLM, on one process or pipelined.
"""

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pipeline_models import causal_lm, packed_batch, sequential_model  # noqa: E402
from ranks import start, start_ranks, wait_all  # noqa: E402

HELPERS = Path(__file__).parent / "helpers"


def _strategy(**kwargs):
    from forgather.strategies import PipelineParallelStrategy

    return PipelineParallelStrategy(**kwargs)


# Arguments, refused when the strategy is built (before any process starts)


def test_a_misspelled_schedule_is_refused_with_the_close_name():
    with pytest.raises(ValueError, match=r"schedule='1FB1' \(config value `pp_schedule`\).*did you mean '1F1B'"):
        _strategy(schedule="1FB1")


@pytest.mark.parametrize("value", [0, -2, 2.5])
def test_n_microbatches_must_be_a_positive_whole_number(value):
    with pytest.raises(ValueError, match=rf"n_microbatches={value} \(config value `n_microbatches`\)"):
        _strategy(n_microbatches=value)


def test_zero_stages_per_rank_is_refused_not_taken_for_the_default():
    with pytest.raises(ValueError, match=r"stages_per_rank=0 .* at least 1, or null"):
        _strategy(schedule="Interleaved1F1B", stages_per_rank=0)


def test_several_stages_a_rank_under_a_single_stage_schedule_are_refused_when_built():
    with pytest.raises(ValueError, match="stages_per_rank=2: schedule GPipe runs one stage a rank; leave"):
        _strategy(schedule="gpipe", stages_per_rank=2)


def test_a_v_schedule_needs_two_stages_a_rank():
    with pytest.raises(ValueError, match="stages_per_rank=3: schedule ZBVZeroBubble folds the stages in a V"):
        _strategy(schedule="ZBVZeroBubble", stages_per_rank=3)


@pytest.mark.parametrize("value", [0, "two"])
def test_pipeline_parallel_size_must_be_auto_or_positive(value):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=.* must be 'auto' or a whole number"):
        _strategy(pipeline_parallel_size=value)


def test_split_points_must_be_a_list():
    with pytest.raises(ValueError, match=r"split_points=2 \(config value `split_points`\) must be a list"):
        _strategy(split_points=2)


def test_a_split_point_past_the_last_layer_names_the_missing_layer():
    from forgather.strategies.pipeline_split import stage_layer_ranges

    with pytest.raises(ValueError, match=r"split_points=\[7\] .* names layer 7, but the model's layers are 0..3"):
        stage_layer_ranges(4, 2, [7])


def test_compiling_the_whole_model_as_one_graph_is_refused():
    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss
    from forgather.strategies.pipeline import _check_module

    with pytest.raises(ValueError, match="compile_scope='model' .* use compile_scope='layers'"):
        _check_module(CausalLMModule(causal_lm(), NaiveLoss(), compile=True, compile_scope="model"))
    _check_module(CausalLMModule(causal_lm(), NaiveLoss(), compile=True, compile_scope="layers"))


def test_resuming_from_a_missing_checkpoint_says_it_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path .*missing does not exist"):
        _strategy().load_checkpoint(tmp_path / "missing")


def test_resuming_from_a_single_file_checkpoint_says_how_to_start_from_its_weights(tmp_path):
    (tmp_path / "single.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"single.ckpt is not a sharded checkpoint directory .* load them into the "
                                         r"module before fit"):
        _strategy().load_checkpoint(tmp_path / "single.ckpt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: as intended
def test_resuming_from_a_weights_only_checkpoint_says_the_optimizer_states_are_missing(tmp_path):
    from torch.distributed import checkpoint as dcp

    from forgather.strategies.checkpoint import load_sharded

    model = sequential_model()
    dcp.save({"state_dict": model.state_dict()}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(ValueError, match=r"holds no state of optimizer 0 \(saved with .*save_weights_only=True"):
        load_sharded(tmp_path, model, [torch.optim.AdamW(model.parameters())])


# The runtime in a one-process gloo group


@pytest.mark.parametrize("rows, batch_size, drop_last, batches, message", [
    (10, 4, False, None, r"each epoch ends with a batch of 2 rows \(10 blocks a replica, batch_size=4\).*set drop_last=true"),
    (10, 6, True, None, r"batch_size=6 does not cut into n_microbatches=4"),
    (10, 4, True, None, None),  # the short batch is left out
    (12, 4, False, None, None),  # no short batch
    (10, 4, False, 2, None),  # the run ends before the epoch's short batch
    (10, 4, False, 3, r"each epoch ends with a batch of 2 rows"),
])
def test_a_loader_whose_batches_would_not_cut_into_microbatches_is_refused_before_training(rows, batch_size, drop_last,
                                                                                        batches, message):
    """The short last batch of an epoch stopped the run after its first epoch; now before the first step."""
    from forgather.strategies.pipeline import check_train_batches

    loader = torch.utils.data.DataLoader(list(range(rows)), batch_size=batch_size, drop_last=drop_last)
    if message is None:
        check_train_batches(loader, 4, batches)
    else:
        with pytest.raises(ValueError, match=message):
            check_train_batches(loader, 4, batches)
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(rows))

    iterable = torch.utils.data.DataLoader(Stream(), batch_size=batch_size)
    check_train_batches(iterable, 4 if batch_size % 4 == 0 else 2, batches)  # length unknown: left to the runtime


@pytest.fixture
def one_process_mesh():
    import torch.distributed as dist

    from forgather.strategies.pipeline_runtime import pipeline_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield pipeline_mesh("cpu", 1)
    finally:
        dist.destroy_process_group()


def _runtime(mesh, model, loss, **kwargs):
    from forgather.strategies.pipeline_runtime import PipelineRuntime

    return PipelineRuntime(model, loss, mesh, torch.device("cpu"), **kwargs)


def test_more_stages_than_layers_are_refused_with_the_stage_count(one_process_mesh):
    # LoopedBFS with 8 stages on one rank: the 6-part model cannot give each stage a layer.
    with pytest.raises(ValueError, match=r"has 6 layers, too few for 8 pipeline stages \(1 ranks x stages_per_rank=8"):
        _runtime(one_process_mesh, sequential_model(), torch.nn.MSELoss(), schedule="LoopedBFS", stages_per_rank=8)


def test_too_few_microbatches_for_the_schedule_name_the_config_value(one_process_mesh):
    with pytest.raises(ValueError, match=r"n_microbatches=1 \(config value `n_microbatches`\) does not suit "
                                         r"ScheduleDualPipeV with 2 stages: DualPipeV requires"):
        _runtime(one_process_mesh, sequential_model(), torch.nn.MSELoss(), schedule="DualPipeV", n_microbatches=1)


def test_a_batch_that_does_not_cut_into_equal_microbatches_is_refused(one_process_mesh):
    runtime = _runtime(one_process_mesh, sequential_model(), torch.nn.MSELoss(), n_microbatches=4)
    with pytest.raises(ValueError, match=r"batch of 6 rows does not cut into n_microbatches=4 .*drop_last=True"):
        runtime.step((torch.randn(6, 6), torch.randn(6, 3)))


def test_evaluating_fewer_rows_than_microbatches_gives_the_whole_batch_loss(one_process_mesh):
    from forgather.loss.naive import NaiveLoss

    reference, batch = causal_lm(), {key: value[:2] for key, value in packed_batch().items()}
    with torch.no_grad():
        hidden = reference.hidden_states(batch["input_ids"], batch["position_ids"])
        expected = NaiveLoss()(hidden, reference.lm_head_weight, batch["labels"])
    runtime = _runtime(one_process_mesh, causal_lm(), NaiveLoss(), n_microbatches=4)
    assert float(runtime.evaluate(batch)) == pytest.approx(float(expected), rel=1e-6)


# Two processes (this file as the script; see the module docstring)


def _fit(out: Path, *args: str, devices: int = 2) -> list:
    out.mkdir()
    arguments = [__file__, str(out), "--devices", str(devices), *args]
    return start_ranks(arguments, devices) if devices > 1 else [start(arguments)]


def _result(out: Path, rank: int = 0) -> dict:
    return json.loads(Path(out, f"result-rank{rank}.json").read_text())


SHAPES = [(8, 12), (4, 12), (8, 7)]  # rows x tokens of the batches stepped one after another


@pytest.fixture(scope="module")
def changing_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    wait_all(start_ranks([__file__, str(out), "--runtime"], 2))
    return out


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_batches_of_changing_shapes_step_like_one_process(changing_shapes, schedule):
    # Before: the stages kept the first batch's shapes; the 4-row batch failed on the last stage.
    # Tolerance: float32 sums in another order, as in test_strategy_pipeline.py.
    for rank in (0, 1):
        for step in _result(changing_shapes, rank)[schedule]:
            assert step["loss"] == pytest.approx(step["reference_loss"], rel=1e-6)
            assert step["max_grad_error"] < 1e-6


@pytest.fixture(scope="module")
def uneven_batches(tmp_path_factory) -> dict[str, Path]:
    """Training batches of 8, 4 and 8 rows (a smaller one in between), validation batches of 8 and 2 rows."""
    root = tmp_path_factory.mktemp("uneven")
    shapes = ("--rows", "8", "4", "8", "--val-rows", "8", "2")
    single, pipelined = root / "single", root / "pipelined"
    wait_all([*_fit(single, *shapes, devices=1), *_fit(pipelined, *shapes)])
    return {"single": single, "pipelined": pipelined}


@pytest.mark.slow  # two fits, three processes
def test_a_smaller_batch_between_full_ones_trains_like_one_process(uneven_batches):
    # Before: the stages kept the first batch's shapes and the last stage failed on the 4-row batch.
    for rank in (0, 1):
        pipelined = _result(uneven_batches["pipelined"], rank)["losses"]
        assert pipelined == pytest.approx(_result(uneven_batches["single"])["losses"], rel=1e-5)


@pytest.mark.slow  # the same two fits
def test_a_validation_batch_smaller_than_the_microbatch_count_validates_like_one_process(uneven_batches):
    # The 2-row validation batch has fewer rows than the 4 microbatches.
    for rank in (0, 1):
        assert _result(uneven_batches["pipelined"], rank)["val_loss"] == pytest.approx(
            _result(uneven_batches["single"])["val_loss"], rel=1e-5)


@pytest.mark.slow  # three two-process fits
def test_a_checkpoint_resumes_exactly_under_another_stage_layout(tmp_path):
    # Saved with 1F1B (stages 0 | 1 on ranks 0 | 1), resumed with Interleaved1F1B (stages 0, 2 | 1, 3): the
    # weights and the optimizer states move to the ranks that now hold them.
    train = str(HELPERS / "pipeline_train.py")
    saved, resumed = tmp_path / "saved", tmp_path / "resumed"
    saved.mkdir()
    resumed.mkdir()
    wait_all(start_ranks([train, str(saved), "--steps", "5", "--save-at", "2"], 2))
    wait_all(start_ranks([train, str(resumed), "--steps", "5", "--resume", str(saved / "step2"),
                          "--schedule", "Interleaved1F1B"], 2))
    uninterrupted = json.loads((saved / "losses-rank0.json").read_text())
    for rank in (0, 1):
        assert json.loads((resumed / f"losses-rank{rank}.json").read_text()) == pytest.approx(uninterrupted[2:],
                                                                                             rel=1e-5)


def test_a_rank_that_fails_ends_the_other_one(tmp_path):
    # Rank 1 raises at its second batch while rank 0 waits on it inside the schedule; rank 0 must fail too,
    # well before the strategy's 120 s collective timeout (gloo's default is half an hour).
    processes = _fit(tmp_path / "failing", "--fail-rank", "1")
    try:
        processes[1].wait(timeout=300)
        failed = time.monotonic()
        processes[0].wait(timeout=300)
        assert time.monotonic() - failed < 60
        assert [process.returncode != 0 for process in processes] == [True, True]
        processes[1].output.seek(0)
        assert "injected failure" in processes[1].output.read().decode(errors="replace")
    finally:
        for process in processes:
            process.kill()
            process.wait()
            process.output.close()


def step_changing_shapes(out: Path) -> None:
    """Each schedule steps the SHAPES batches in turn; each step is compared with the whole model's."""
    import torch.distributed as dist

    from forgather.loss.naive import NaiveLoss
    from forgather.strategies.pipeline_runtime import PipelineRuntime, pipeline_mesh

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {}
    for schedule in ("1F1B", "ZBVZeroBubble"):
        model, reference = causal_lm(), causal_lm()
        runtime = PipelineRuntime(model, NaiveLoss(), pipeline_mesh("cpu", 2), torch.device("cpu"), schedule=schedule,
                                  n_microbatches=4)
        steps = []
        for seed, (rows, tokens) in enumerate(SHAPES):
            batch = {key: value[:rows, :tokens] for key, value in packed_batch(seed).items()}
            model.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            loss = float(runtime.step(batch))
            hidden = reference.hidden_states(batch["input_ids"], batch["position_ids"])
            reference_loss = NaiveLoss()(hidden, reference.lm_head_weight, batch["labels"])
            reference_loss.backward()
            grads = dict(reference.named_parameters())
            errors = [float((p.grad - grads[name].grad).abs().max()) for name, p in model.named_parameters()]
            steps.append({"loss": loss, "reference_loss": float(reference_loss), "max_grad_error": max(errors)})
        result[schedule] = steps
    Path(out, f"result-rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss
    from forgather.strategies import PipelineParallelStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 8, 8], help="rows of each training batch")
    parser.add_argument("--val-rows", type=int, nargs="*", default=[], help="rows of each validation batch")
    parser.add_argument("--fail-rank", type=int, help="this rank raises at its second training batch")
    parser.add_argument("--runtime", action="store_true", help="step_changing_shapes instead of a fit")
    args = parser.parse_args()
    if args.runtime:
        return step_changing_shapes(args.out)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    result: dict = {"losses": []}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_rank == args.fail_rank and batch_idx == 1:
                raise RuntimeError("injected failure")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            result["losses"].append(float(outputs["loss"]))

        def on_validation_end(self, trainer, module) -> None:
            result["val_loss"] = float(trainer.callback_metrics["val/loss"])

    def batches(rows: list[int], seed: int) -> list[dict]:
        return [{key: value[:count] for key, value in packed_batch(seed + i).items()} for i, count in enumerate(rows)]

    module = CausalLMModule(causal_lm(), NaiveLoss(), functools.partial(torch.optim.AdamW, lr=1e-2))
    strategy = "auto"
    if args.devices > 1:
        strategy = PipelineParallelStrategy("1F1B", n_microbatches=4, timeout=datetime.timedelta(seconds=120))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=len(args.rows), num_sanity_val_steps=0,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()],
    )
    val = DataLoader(batches(args.val_rows, 100), batch_size=None) if args.val_rows else None
    trainer.fit(module, DataLoader(batches(args.rows, 0), batch_size=None), val)
    Path(args.out, f"result-rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
