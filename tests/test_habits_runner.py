"""Hydra users' habits on the runner: --cfg job|hydra|all, --resolve, --info's choices, `forgather train` taking
every runner option, and bash/zsh tab completion of the `forgather` command."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgather import run
from forgather.cli import completion
from forgather.cli.main import main as forgather_main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")
FORGATHER = Path(sys.executable).with_name("forgather")


def runner(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run.main(["-p", PROJECT, "+experiment=micro", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- --cfg, --resolve, --info ----------------------------------------------------------------------------


def test_cfg_job_is_the_config_bare_cfg_prints(capsys):
    _, bare, _ = runner(capsys, "--cfg", "max_steps=3")
    code, job, _ = runner(capsys, "--cfg", "job", "max_steps=3")
    assert code == 0 and job == bare and yaml.safe_load(job)["max_steps"] == 3 and "hydra" not in yaml.safe_load(job)


def test_cfg_hydra_prints_the_runners_settings_alone(capsys):
    code, out, _ = runner(capsys, "--cfg", "hydra", "optimizer=adafactor", "lr=1e-3")
    settings = yaml.safe_load(out)
    assert code == 0 and list(settings) == ["hydra"]
    assert settings["hydra"]["runtime"]["choices"]["optimizer"] == "adafactor"
    assert settings["hydra"]["overrides"]["task"] == ["+experiment=micro", "optimizer=adafactor", "lr=1e-3"]
    assert settings["hydra"]["mode"] == "RUN" and settings["hydra"]["searchpath"][0].endswith("runner_project/templates")


def test_cfg_all_prints_the_config_and_the_settings(capsys):
    code, out, _ = runner(capsys, "--cfg", "all", "max_steps=3")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["max_steps"] == 3 and printed["hydra"]["runtime"]["experiment"] == "micro"


def test_resolve_fills_in_interpolations(capsys):
    _, plain, _ = runner(capsys, "--cfg", "max_steps=7")
    code, resolved, _ = runner(capsys, "--cfg", "--resolve", "max_steps=7")
    assert "${max_steps}" in plain
    assert code == 0 and "${" not in resolved
    assert yaml.safe_load(resolved)["trainer"]["max_steps"] == 7


def test_resolve_without_cfg_is_a_one_line_error(capsys):
    code, _, err = runner(capsys, "--resolve")
    assert code == 2 and err.count("\n") == 1 and "--cfg" in err


def test_resolve_names_the_key_of_a_broken_interpolation(capsys):
    code, _, err = runner(capsys, "--cfg", "--resolve", "~max_steps")
    assert code == 2 and err.count("\n") == 1 and "lr_scheduler.lr_lambda.total_steps" in err and "max_steps" in err


def test_info_shows_the_option_of_each_group_the_experiment_uses(capsys):
    code, out, _ = runner(capsys, "--info", "optimizer=adafactor")
    used = out.split("uses:\n", 1)[1].split()
    assert code == 0 and "experiment micro (configs/micro.yaml) uses:" in out
    # model/tiny.yaml includes model/llama.yaml: the choice is tiny; the options stay listed above.
    assert {"optimizer=adafactor", "model=tiny", "loss=naive", "trainer=cpu"} <= set(used)
    assert "model=llama" not in used and "model: llama, llama_1b, llama_7b, small, tiny" in out


# -- forgather train takes what python -m forgather.run takes ---------------------------------------------

# A value for each runner option that takes one.
VALUES = {"cfg": "all", "devices": "0,1", "outputs": "/somewhere", "from_snapshot": "/a/run", "resume": "/a/run", "checkpoint": "600", "project": PROJECT, "template_path": "/templates"}


def _runner_options() -> list[argparse.Action]:
    # --dynamic-args is the runner's end of `forgather train`'s own config arguments (test_project_dynamic_args).
    return [a for a in run.build_parser()._actions if a.option_strings and a.dest not in ("help", "dynamic_args")]


@pytest.mark.parametrize("action", _runner_options(), ids=lambda a: a.option_strings[-1])
def test_every_runner_option_works_through_forgather_train(action, monkeypatch):
    handed = []
    monkeypatch.setattr(run, "main", lambda argv: handed.append(argv) or 0)
    value = [] if action.nargs == 0 else [VALUES[action.dest]]
    for flag in action.option_strings:
        # -p and --template-path are options of `forgather` itself; the rest follow `train`.
        if action.dest in ("project", "template_path"):
            argv = [flag, *value, "-t", "micro.yaml", "train", "lr=1e-3"]
        else:
            argv = ["-p", PROJECT, "-t", "micro.yaml", "train", flag, *value, "lr=1e-3"]
        assert forgather_main(argv) == 0
        through_train = run.build_parser().parse_intermixed_args(handed[-1])
        direct = run.build_parser().parse_intermixed_args([flag, *value, "lr=1e-3"])
        assert getattr(through_train, action.dest) == getattr(direct, action.dest), f"{flag} did not reach the runner"
        assert through_train.overrides[-1] == "lr=1e-3"


def test_train_takes_overrides_between_options_as_the_runner_does(capsys):
    assert forgather_main(["-p", PROJECT, "-t", "micro.yaml", "train", "lr=1e-3", "--cfg", "job", "max_steps=3"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["lr"] == 1e-3 and config["max_steps"] == 3


def test_train_info_lists_the_experiments_choices(capsys):
    assert forgather_main(["-p", PROJECT, "-t", "micro.yaml", "train", "--info", "optimizer=adafactor"]) == 0
    assert "  optimizer=adafactor\n" in capsys.readouterr().out


# -- tab completion ----------------------------------------------------------------------------------------


@pytest.fixture
def in_project(monkeypatch):
    monkeypatch.chdir(PROJECT)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("forgather tra", ["train"]),
        ("forgather tr", ["train", "trefs"]),
        ("forgather -t ", ["micro.yaml"]),
        ("forgather pp --config-template ", ["micro.yaml"]),  # forgather's options after the command too
        ("forgather control ", ["abort", "cleanup", "list", "save", "save-stop", "status", "stop"]),
        ("forgather train --cfg ", ["all", "hydra", "job"]),
        ("forgather train +experiment=", ["+experiment=micro", "+experiment=tiny_llama"]),
        ("forgather train sched", ["scheduler="]),
        ("forgather train scheduler=", ["scheduler=constant", "scheduler=cosine", "scheduler=wsd"]),
        ("forgather -t micro.yaml train trainer.max_", ["trainer.max_steps="]),
        ("forgather train -t micro.yaml trainer.max_", ["trainer.max_steps="]),
        ("forgather -t micro.yaml train ~trainer.gradient_c", ["~trainer.gradient_clip_val"]),
        ("forgather train +experiment=micro optimizer=adafactor optimizer.", ["optimizer.lr="]),
    ],
)
def test_completion_of_subcommands_configs_groups_and_keys(in_project, line, expected):
    assert completion.candidates(line) == expected


def test_completion_offers_the_runners_flags_for_train(in_project):
    offered = completion.candidates("forgather train --")
    assert {"--cfg", "--resolve", "--info", "--multirun", "--resume", "--from-snapshot"} <= set(offered)


def test_completion_offers_job_ids_and_pids_to_control(in_project, monkeypatch, tmp_path):
    from forgather.callbacks import job_registry

    monkeypatch.setenv(job_registry.CACHE_ENV, str(tmp_path))
    job_registry.write_record(job_registry.JobRecord("cafe1234", os.getpid(), os.uname().nodename, "/r", time.time(), 0, "/s"))  # registered once running
    assert completion.candidates("forgather control status ") == sorted(["cafe1234", str(os.getpid())])


def _bash_complete(words: list[str], line: str) -> list[str]:
    """Source the bash script and run its completion function as bash would for `line` (split into bash's
    COMP_WORDS, which break at '=')."""
    script = (
        'eval "$(forgather completion bash)"\n'
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_forgather_complete 2>/dev/null; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{FORGATHER.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_completes_group_options_after_bash_splits_at_the_equals_sign():
    line = "forgather -t micro.yaml train scheduler=c"
    words = ["forgather", "-t", "micro.yaml", "train", "scheduler", "=", "c"]
    assert _bash_complete(words, line) == ["constant", "cosine"]
    assert _bash_complete(words[:-1], line[:-1]) == ["=constant", "=cosine", "=wsd"]
    assert _bash_complete(["forgather", "contr"], "forgather contr") == ["control"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_script_hands_whole_words_to_compadd():
    # zsh's completion builtins only exist inside a completion widget: stand-ins print what they are given.
    script = (
        "compdef() { :; }; compadd() { print -r -- \"compadd $*\"; }; _files() { print _files; }\n"
        'eval "$(forgather completion zsh)"\n'
        "for BUFFER in 'forgather -t micro.yaml train sched' 'forgather train scheduler=c' 'forgather -p '; do\n"
        "  CURSOR=${#BUFFER}; _forgather_complete\n"
        "done\n"
    )
    env = {**os.environ, "PATH": f"{FORGATHER.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["zsh", "-f", "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60, check=True)
    # `key=` without a trailing space; finished words with one; nothing to offer: file names.
    assert result.stdout.splitlines() == ["compadd -Q -S  -- scheduler=", "compadd -Q -- scheduler=constant scheduler=cosine", "_files"]


def test_completion_without_a_shell_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "forgather", "completion"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "forgather completion bash" in result.stderr
