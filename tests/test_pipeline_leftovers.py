"""Leftovers of the PipelineParallelStrategy audit: a rank whose stages are all frozen trains on with the others
(and a model frozen everywhere is refused in one line); another strategy's sharded checkpoint is refused as
ckpt_path, ours from before the format marker still load; staging left by a killed sharded save is removed when
the next fit starts; Lightning's LR finder inside a fit restores the optimizer as it was and each rank trains
its own stages after it.

Run as a script, this file is a rank of the fits below: `python THIS OUT --frozen first|all` fits a tiny CausalLM
over two ranks with the first rank's stages (resp. every parameter) frozen, saving after step 1 and resuming from
there, and writes `<out>/frozen-rank<R>.pt`; `--staging` fits on one process with a ModelCheckpoint in
`<out>/checkpoints`; `--lr-finder` fits over two ranks with a LearningRateFinder callback and writes
`<out>/lr-finder-rank<R>.json`.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pipeline_models import causal_lm, packed_batch  # noqa: E402
from ranks import failed_outputs, start, start_ranks, wait_all  # noqa: E402


# A rank with nothing to train


def test_a_rank_whose_stages_are_all_frozen_trains_on_with_the_others(tmp_path):
    # Before: configure_optimizers on rank 0 failed with torch's "optimizer got an empty parameter list".
    wait_all(start_ranks([__file__, str(tmp_path), "--frozen", "first"], 2))
    first, second = (torch.load(tmp_path / f"frozen-rank{rank}.pt") for rank in (0, 1))
    assert first["steps"] == second["steps"] == 3  # two steps, then one more after resuming from step 1's save
    assert first["optimized"] == 0 < second["optimized"]
    assert first["lr"] == second["lr"]  # the empty optimizer keeps the schedule's learning rate
    for rank in (first, second):
        for name, value in rank["after"].items():
            moved = not torch.equal(value, rank["before"][name])
            assert moved == rank["trainable"][name], name


def test_every_parameter_frozen_on_one_process_is_refused_in_one_line():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from forgather.errors import UserError
    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss

    model = causal_lm().requires_grad_(False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError) as refused:
        trainer.fit(CausalLMModule(model, NaiveLoss()), DataLoader([packed_batch()], batch_size=None))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("every parameter of the model (CausalLM) is frozen (requires_grad=False)")
    assert "unfreeze some" in message


@pytest.mark.slow  # a two-process fit that fails at setup
def test_a_pipelined_model_frozen_on_every_rank_is_refused_in_one_line(tmp_path):
    for output in failed_outputs(start_ranks([__file__, str(tmp_path), "--frozen", "all"], 2)):  # both ranks
        assert ("every parameter of the model is frozen (requires_grad=False) on every pipeline stage, so there is "
                "nothing to train") in output


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: as intended
def test_an_optimizer_over_no_parameters_saves_nothing_and_loads_another_ranks_settings(tmp_path):
    # Before: torch refused to describe it ("optim state_dict is empty"), so the frozen rank could not save.
    from torch.distributed import checkpoint as dcp

    from forgather.strategies.checkpoint import load_sharded, optimizer_state

    model = causal_lm()
    trained = torch.optim.AdamW(model.parameters(), lr=3e-3)  # another rank's, as its scheduler left it
    empty = torch.optim.AdamW([{"params": []}], lr=1e-2)
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": optimizer_state(model, trained)},
             checkpoint_id=tmp_path, no_dist=True)
    assert optimizer_state(model, empty) == {}
    load_sharded(tmp_path, model, [empty])
    assert empty.param_groups[0]["lr"] == 3e-3 and empty.param_groups[0]["params"] == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_settings_added_to_the_groups_since_the_save_do_not_stop_a_restore(tmp_path):
    # Lightning's LR finder adds `initial_lr` to the groups, then restores the state from before its search.
    # Before: the restore asked the checkpoint for it: "Missing key in checkpoint state_dict".
    from torch.distributed import checkpoint as dcp

    from forgather.strategies.checkpoint import load_sharded, optimizer_state

    model = causal_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": optimizer_state(model, optimizer)},
             checkpoint_id=tmp_path, no_dist=True)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 1e-8
    load_sharded(tmp_path, model, [optimizer])
    assert optimizer.param_groups[0]["lr"] == 3e-3 and "initial_lr" not in optimizer.param_groups[0]


# Another strategy's checkpoint as ckpt_path


def _checkpoint_directory(path: Path, state: dict, meta: dict) -> Path:
    from lightning_fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed import checkpoint as dcp

    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save(meta, path / _METADATA_FILENAME)
    return path


def _strategy_of(module):
    from forgather.strategies import PipelineParallelStrategy

    strategy = PipelineParallelStrategy()
    strategy._lightning_module = module
    return strategy


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_fsdp_checkpoint_given_as_ckpt_path_is_refused_naming_it(tmp_path):
    # Before: it passed the meta.pt check and failed inside torch.distributed.checkpoint with a missing key.
    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss

    module = CausalLMModule(causal_lm(), NaiveLoss())
    fsdp = _checkpoint_directory(tmp_path / "fsdp", {"model": module.state_dict()}, {"global_step": 2})
    with pytest.raises(ValueError) as refused:
        _strategy_of(module).load_checkpoint(fsdp)
    message = str(refused.value)
    assert "\n" not in message
    assert "fsdp is an FSDPStrategy sharded checkpoint (its weights under 'model'), not one written by " \
           "PipelineParallelStrategy; resume it with the strategy that wrote it" in message
    assert "pytorch_lightning.utilities.consolidate_checkpoint" in message


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_written_before_the_format_marker_still_loads(tmp_path):
    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss

    saved = CausalLMModule(causal_lm(seed=1), NaiveLoss())
    old = _checkpoint_directory(tmp_path / "old", {"state_dict": saved.state_dict()}, {"global_step": 2})
    module = CausalLMModule(causal_lm(seed=0), NaiveLoss())
    assert _strategy_of(module).load_checkpoint(old) == {"global_step": 2}
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)


# Staging of a killed sharded save


def test_staging_left_by_killed_sharded_saves_is_removed_when_a_fit_starts(tmp_path):
    # Before: `.NAME.tmp` directories of saves killed mid-write stayed beside the checkpoints forever.
    checkpoints = tmp_path / "checkpoints"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid no live process has, once it is waited for
    finished.wait()
    old_style, dead, live = (checkpoints / name for name in (".last.tmp", f".step1.tmp-{finished.pid}",
                                                             f".step2.tmp-{os.getpid()}"))
    for staging in (old_style, dead, live):
        staging.mkdir(parents=True)
    wait_all([start([__file__, str(tmp_path), "--staging"])])
    assert not old_style.exists() and not dead.exists()
    assert live.is_dir()  # a save in progress in another process
    saved = [path.name for path in checkpoints.iterdir() if not path.name.startswith(".")]
    assert saved == ["epoch=0-step=2.ckpt"]
    # Before: the gloo group lived into interpreter teardown, where it aborted the process now and then (-6)
    assert (tmp_path / "group-at-exit").read_text() == "destroyed"


# Lightning's LR finder


def test_the_lr_finder_within_a_fit_restores_the_optimizer_and_each_rank_trains_its_own_stages(tmp_path):
    # Before: restoring the state from before the search failed on every rank: "Missing key in checkpoint
    # state_dict: optimizer_0.param_groups.<name>.initial_lr" (the finder's setting, added since its save).
    # The finder replaces every callback during its search, the strategy's gathering too: no rank gathers.
    wait_all(start_ranks([__file__, str(tmp_path), "--lr-finder"], 2))
    whole = len(list(causal_lm().parameters()))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"lr-finder-rank{rank}.json").read_text())
        assert result["steps"] == 2
        assert len(set(result["held"])) == 1 and result["held"][0] < whole  # its stages only, at every step
        assert result["held"][0] == result["optimized"]
        assert result["whole_at_end"] == (rank == 0)
        assert [(group["lr"], "initial_lr" in group) for group in result["groups"]] == [(1e-2, False)]


# The ranks of the fits above


def _trainer(devices: int, strategy, **kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, use_distributed_sampler=False,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _module(model, scheduled: bool = True):
    from forgather.lightning.module import CausalLMModule
    from forgather.loss.naive import NaiveLoss

    scheduler = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.1, total_iters=4)
    return CausalLMModule(model, NaiveLoss(), functools.partial(torch.optim.AdamW, lr=1e-2),
                          scheduler if scheduled else None)


def fit_frozen(out: Path, frozen: str) -> None:
    """Rank 0 holds the embedding and layers 0-1, all frozen (`frozen="first"`; the tied head on rank 1 with
    them), or every parameter is (`"all"`); two steps, saving after the first, then one more resumed from it."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from forgather.strategies import PipelineParallelStrategy

    def frozen_model():
        model = causal_lm()
        for part in (model, ) if frozen == "all" else (model.embed, model.layers[0], model.layers[1]):
            part.requires_grad_(False)
        return model

    class SaveAfterFirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                trainer.save_checkpoint(out / "step1")

    data = DataLoader([packed_batch(seed) for seed in (1, 2, 3)], batch_size=None)
    module = _module(frozen_model())
    before = {}

    class Before(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            before.update({key: value.clone() for key, value in module.state_dict().items()})

    strategy = functools.partial(PipelineParallelStrategy, "1F1B", 4, split_points=[2], gather_at_end=False)
    trainer = _trainer(2, strategy(), max_steps=2, enable_checkpointing=False, gradient_clip_val=0.5,
                       callbacks=[Before(), SaveAfterFirstStep()])
    trainer.fit(module, data)
    module = _module(frozen_model())  # the first fit pruned its own to this rank's stages
    resumed = _trainer(2, strategy(), max_steps=3, enable_checkpointing=False, gradient_clip_val=0.5)
    resumed.fit(module, data, ckpt_path=out / "step1")
    named = dict(module.named_parameters())
    torch.save({
        "steps": resumed.global_step, "before": before, "after": module.state_dict(),
        "trainable": {key: key in named and named[key].requires_grad for key in before},
        "optimized": sum(len(group["params"]) for group in resumed.optimizers[0].param_groups),
        "lr": resumed.optimizers[0].param_groups[0]["lr"],
    }, out / f"frozen-rank{resumed.global_rank}.pt")


def fit_staging(out: Path) -> None:
    """Two steps on one process with a ModelCheckpoint in `<out>/checkpoints` (it saves at the end); writes
    `<out>/group-at-exit`: whether the process group was destroyed before the last exit handler."""
    import atexit

    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from forgather.strategies import PipelineParallelStrategy

    # Registered first, so run last (exit handlers run in reverse)
    atexit.register(lambda: (out / "group-at-exit").write_text(
        "alive" if torch.distributed.is_initialized() else "destroyed"))
    trainer = _trainer(1, PipelineParallelStrategy("1F1B", 4), max_steps=2,
                       callbacks=[ModelCheckpoint(dirpath=out / "checkpoints")])
    trainer.fit(_module(causal_lm()), DataLoader([packed_batch()] * 2, batch_size=None))


def fit_after_lr_finder(out: Path) -> None:
    """A LearningRateFinder callback searches three steps, then the fit trains two; writes, per training step,
    how many parameters the module held, and what its optimizer held."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateFinder
    from torch.utils.data import DataLoader

    from forgather.strategies import PipelineParallelStrategy

    held = []

    class Held(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            held.append(len(list(module.parameters())))

    finder = LearningRateFinder(num_training_steps=3, update_attr=False)
    trainer = _trainer(2, PipelineParallelStrategy("1F1B", 4), max_steps=2, enable_checkpointing=False,
                       default_root_dir=out, callbacks=[Held(), finder])
    module = _module(causal_lm(), scheduled=False)  # no scheduler of its own: the finder's adds `initial_lr`
    trainer.fit(module, DataLoader([packed_batch(seed) for seed in (1, 2, 3, 4)], batch_size=None))
    Path(out, f"lr-finder-rank{trainer.global_rank}.json").write_text(json.dumps({
        "steps": trainer.global_step, "held": held,
        "optimized": sum(len(group["params"]) for group in trainer.optimizers[0].param_groups),
        "groups": [{k: v for k, v in group.items() if k != "params"} for group in trainer.optimizers[0].param_groups],
        "whole_at_end": len(list(module.parameters())) == len(list(causal_lm().parameters())),
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--frozen", choices=("first", "all"), help="fit_frozen (two ranks)")
    parser.add_argument("--staging", action="store_true", help="fit_staging (one process)")
    parser.add_argument("--lr-finder", action="store_true", help="fit_after_lr_finder (two ranks)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import pytorch_lightning as pl

    pl.seed_everything(0)
    if args.frozen:
        return fit_frozen(args.out, args.frozen)
    if args.staging:
        return fit_staging(args.out)
    fit_after_lr_finder(args.out)


if __name__ == "__main__":
    main()
