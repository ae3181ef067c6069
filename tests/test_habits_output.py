"""Quieter output: what a run prints in a terminal (a pseudo-terminal, so Rich draws its live bar), and the
filters that silence Lightning's two every-run notices and nothing else."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from forgather.lightning.module import CausalLMModule
from forgather.lightning.progress import ProgressBar
from forgather.lightning.quiet import quiet_lightning
from helpers.tiny_lm import tiny_model, toy_loader

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_terminal(argv: list[str], cwd: Path) -> str:
    """Run `argv` with stdout and stderr on one pseudo-terminal; what the terminal received, ANSI codes
    removed (carriage returns kept: Rich redraws its bar after one)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env)
    os.close(follower)
    received = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the last writer closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, received.decode(errors="replace")[-3000:]
    return _ANSI.sub("", received.decode(errors="replace"))


@pytest.fixture(scope="module")
def run_and_resume(tmp_path_factory) -> tuple[str, str]:
    """A 6-step run of the micro experiment, then its resume to 10 steps, as a terminal shows them."""
    where = tmp_path_factory.mktemp("terminal")
    runner = [sys.executable, "-m", "forgather.run"]
    first = in_terminal([*runner, "-p", PROJECT, "+experiment=micro", "max_steps=6"], where)
    (run_dir,) = (where / "outputs" / "micro").iterdir()
    resumed = in_terminal([*runner, "--resume", str(run_dir), "max_steps=10"], where)
    return first, resumed


def test_a_run_prints_neither_the_litlogger_tip_nor_the_leafspec_warning(run_and_resume):
    for printed in run_and_resume:
        assert "litlogger" not in printed and "LeafSpec" not in printed
        assert "GPU available: False" in printed  # Lightning's other notices still show


def test_fit_stopped_is_a_line_of_its_own_not_glued_to_the_bar(run_and_resume):
    first, _ = run_and_resume
    (line,) = [line for line in re.split(r"[\r\n]+", first) if "`Trainer.fit` stopped" in line]
    assert line.startswith("`Trainer.fit` stopped: `max_steps=6` reached.")


def test_the_bar_after_a_resume_counts_to_its_own_total(run_and_resume):
    _, resumed = run_and_resume
    counts = re.findall(r"Epoch 0 \S+ (\d+)/(\d+)", resumed)
    assert counts and counts[-1] == ("10", "10")


def test_the_bar_shows_no_v_num_in_plain_lightning(tmp_path, one_thread):
    bar = ProgressBar(console_kwargs={"file": io.StringIO()})
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), callbacks=[bar],
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    module = CausalLMModule(tiny_model())
    trainer.fit(module, toy_loader(2))
    shown = bar.get_metrics(trainer, module)
    assert "v_num" not in shown and "train/loss" in shown
    # shown from the callback metrics: as a progress-bar metric Lightning would read it after every batch
    assert shown["train/loss"] == float(trainer.callback_metrics["train/loss"])
    assert "train/loss" not in trainer.progress_bar_metrics


def _warn_from(module: str, message: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_lightning()
        warnings.warn_explicit(message, FutureWarning, "somewhere.py", 1, module=module)
    return caught


def test_only_lightnings_leafspec_warning_is_silenced():
    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
    assert _warn_from("pytorch_lightning.utilities._pytree", leafspec) == []
    assert len(_warn_from("my_code", leafspec)) == 1  # the same deprecation in the user's code still warns
    assert len(_warn_from("pytorch_lightning.utilities._pytree", "something else is deprecated")) == 1


def test_only_the_litlogger_tip_is_dropped_from_lightnings_log():
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        quiet_lightning()
        logger.warning("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/) to enable LitLogger.")
        logger.warning("`Trainer.fit` stopped: `max_steps=6` reached.")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "`Trainer.fit` stopped: `max_steps=6` reached.\n"
