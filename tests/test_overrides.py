"""Overrides on the runner's config (--cfg: nothing is built): every form of the grammar, and each error."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from forgather.run import main

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "runner_project")


def config_of(capsys, *overrides: str) -> dict:
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg", *overrides]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def error_of(capsys, *arguments: str) -> str:
    assert main(["-p", PROJECT, "--cfg", *arguments]) == 2
    return capsys.readouterr().err


def test_change_a_top_level_value_reaches_every_use(capsys):
    config = config_of(capsys, "lr=1e-4", "hidden_size=48")
    assert config["lr"] == 1e-4 and config["optimizer"]["lr"] == "${lr}"
    assert config["hidden_size"] == 48 and config["model"]["hidden_size"] == "${hidden_size}"


def test_change_a_nested_value(capsys):
    assert config_of(capsys, "trainer.gradient_clip_val=0.5")["trainer"]["gradient_clip_val"] == 0.5


def test_add_force_add_and_delete(capsys):
    config = config_of(capsys, "+trainer.benchmark=false", "++seed=7", "++extra.note=hi", "~trainer.deterministic")
    assert config["trainer"]["benchmark"] is False and config["seed"] == 7 and config["extra"] == {"note": "hi"}
    assert "deterministic" not in config["trainer"]


def test_group_swap_changes_the_component(capsys):
    config = config_of(capsys, "optimizer=adafactor", "scheduler=wsd", "loss=chunked")
    assert config["optimizer"]["_target_"] == "forgather.optim:Adafactor"
    assert config["lr_scheduler"]["lr_lambda"]["_target_"] == "forgather.optim.schedules:warmup_stable_decay"
    assert config["loss"]["_target_"] == "forgather.loss.chunked:ChunkedLoss"


def test_library_experiment_is_found_without_a_project(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["+experiment=tiny_llama", "--cfg", "max_steps=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_steps"] == 5


def test_sweep_expands_comma_range_and_choice(capsys):
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg", "-m", "lr=1e-3,2e-3", "num_layers=range(1,4)", "seed=choice(1,2)"]) == 0
    out = capsys.readouterr().out
    assert out.count("# run ") == 2 * 3 * 2 and "# run 11: experiment=micro lr=0.002 num_layers=3 seed=2" in out


def test_glob_sweeps_over_group_options(capsys):
    sweep = "optimizer=glob(ada*,exclude=[*triton,*backward,*_sr,*_compiled])"
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg", "-m", sweep]) == 0
    out = capsys.readouterr().out
    assert out.count("# run ") == 2 and "forgather.optim:Adafactor" in out and "triton_adamw:TritonAdamW" in out
    assert "TritonAdafactor" not in out


@pytest.mark.parametrize("sweep, says", [
    ("num_layers=range(5,1)", "num_layers=range(5,1) gives no values to sweep"),
    ("num_layers=range(1,4,0)", "num_layers=range(1,4,0): range() arg 3 must not be zero"),
])
def test_a_sweep_of_no_values_is_an_error_naming_it(capsys, sweep, says):
    assert says in error_of(capsys, "+experiment=micro", "-m", sweep)


def test_a_range_counting_down_sweeps(capsys):
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg", "-m", "num_layers=range(3,1,-1)"]) == 0
    assert re.findall(r"# run \d+: experiment=micro num_layers=(\d)", capsys.readouterr().out) == ["3", "2"]


def test_deleting_a_key_the_config_still_reads_names_its_readers(capsys):
    """It was a bare KeyError (`error: tokenizer`) or OmegaConf's multi-line message, once construction began."""
    assert error_of(capsys, "+experiment=micro", "~lr") == (
        "error: ~lr: the config still reads lr at optimizer.lr (${lr}); delete or set those too, or give lr another "
        "value instead of deleting it\n")
    assert "lr" not in config_of(capsys, "~lr", "~optimizer.lr")["optimizer"]  # its reader deleted too
    assert config_of(capsys, "~lr", "+lr=0.5")["lr"] == 0.5  # added again


def test_unknown_key_suggests_the_close_one(capsys):
    assert "did you mean 'trainer.max_steps'" in error_of(capsys, "+experiment=micro", "trainer.max_step=3")


def test_a_key_through_a_list_by_name_says_how_to_reach_the_element_by_position(capsys):
    """A !dlist's names do not survive into the config: the error says which element resembles the name and
    the path that reaches it, and that path works."""
    err = error_of(capsys, "+experiment=micro", "trainer.callbacks.checkpoint.save_last=false")
    assert "trainer.callbacks is a list, whose elements go by position (0: ModelCheckpoint" in err
    assert err.rstrip().endswith("write trainer.callbacks._args_.0.0.save_last=...")
    config = config_of(capsys, "trainer.callbacks._args_.0.0.save_last=false")
    assert config["trainer"]["callbacks"]["_args_"][0][0]["save_last"] is False
    assert "trainer.callbacks._args_.0.2.run_dir" in error_of(capsys, "+experiment=micro",
                                                               "trainer.callbacks.job_control.run_dir=x")


def test_unknown_top_level_key_suggests_the_variable(capsys):
    assert "did you mean 'hidden_size'" in error_of(capsys, "+experiment=micro", "hiden_size=3")


@pytest.mark.parametrize("theirs, ours", [("seq_len", "block_size"), ("num_hidden_layers", "num_layers"),
                                          ("learning_rate", "lr"), ("n_embd", "hidden_size")])
def test_another_tools_name_for_a_key_gets_ours(capsys, theirs, ours):
    """Hugging Face's and nanoGPT's names, too far from ours for a spelling match."""
    err = error_of(capsys, "+experiment=micro", f"{theirs}=3")
    assert f"no key {theirs!r} in the config; it is called {ours!r} here ({ours}=...)" in err


def test_a_key_neither_close_nor_known_by_another_name_gets_no_guess(capsys):
    assert error_of(capsys, "+experiment=micro", "zzz=3").rstrip().endswith("no key 'zzz' in the config")


@pytest.mark.parametrize("override, options", [
    ("bucket_size=50000000", "optimizer=adamw_in_backward"),
    ("tokenizer_path=tok", "tokenizer=pretrained"),
    ("data_path=docs.jsonl", "data=hf_disk or data=jsonl or data=streaming"),
])
def test_a_key_of_another_group_option_names_that_option(capsys, override, options):
    """A config value that this experiment's options lack but another option of a group declares (`!var`)."""
    key = override.partition("=")[0]
    err = error_of(capsys, "+experiment=micro", override)
    assert f"no key {key!r} in the config; {key} is a config value of {options}: choose that option, or leave " \
           f"{key} out" in err


def test_a_near_spelling_here_comes_before_the_options_that_declare_the_key(capsys):
    """data=text_files takes data_paths; data_path is the other data options' value: both are said, the near
    spelling first. A loose likeness (bucket_size / block_size) is not offered before the declaring option."""
    err = error_of(capsys, "+experiment=micro", "data=text_files", "data_path=notes")
    assert ("no key 'data_path' in the config; did you mean 'data_paths'? (data_path is a config value of "
            "data=hf_disk or data=jsonl or data=streaming: choose that option, or leave data_path out)") in err
    assert "did you mean" not in error_of(capsys, "+experiment=micro", "bucket_size=5")


def test_declared_by_options_reads_each_var_form(tmp_path):
    from forgather.overrides import declared_by_options

    group = tmp_path / "optimizer"
    group.mkdir()
    (group / "braced.yaml").write_text("x: !var { name: beta2, default: 0.99 }\n")
    (group / "quoted.yaml").write_text('x: !var "beta2"\n')
    (group / "bare.yaml").write_text("x: !var beta2\n")
    (group / "other.yaml").write_text("x: !var { name: beta22 }\ny: !var beta\n")
    groups = {"optimizer": ["bare", "braced", "other", "quoted"]}
    assert declared_by_options("beta2", [str(tmp_path)], groups) == [
        "optimizer=bare", "optimizer=braced", "optimizer=quoted"]
    assert declared_by_options("optimizer.beta2", [str(tmp_path)], groups) == []


def test_unknown_group_option_lists_the_options(capsys):
    err = error_of(capsys, "+experiment=micro", "optimizer=adamx")
    assert "no option 'adamx' in group 'optimizer'; did you mean 'adamw'" in err and "adafactor" in err


def test_unknown_experiment_suggests(capsys):
    assert "did you mean 'micro'" in error_of(capsys, "+experiment=mikro")


def test_wrong_type_is_an_error(capsys):
    assert "max_steps is int (12); got str 'many'" in error_of(capsys, "+experiment=micro", "max_steps=many")


def test_replacing_a_component_with_a_scalar_is_an_error(capsys):
    assert "module is a component" in error_of(capsys, "+experiment=micro", "module=5")


def test_adding_an_existing_key_is_an_error(capsys):
    assert "'lr' is already set" in error_of(capsys, "+experiment=micro", "+lr=1")


def test_deleting_a_missing_key_is_an_error(capsys):
    assert "no key 'trainer.nope'" in error_of(capsys, "+experiment=micro", "~trainer.nope")


def test_sweep_without_multirun_is_an_error(capsys):
    assert "add -m" in error_of(capsys, "+experiment=micro", "lr=1e-3,2e-3")


def test_override_through_a_reference_points_to_the_referenced_key(capsys):
    assert "override through the referenced key instead (optimizer.lr=...)" in error_of(capsys, "+experiment=micro", "module.optimizer.lr=1")


def test_parse_error_names_the_override_that_fails(capsys):
    err = error_of(capsys, "+experiment=micro", "max_steps=2", "lr=[1,", "batch_size=2")
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: lr=[1,: cannot parse this override (") and "quote a value holding commas" in line
    assert "max_steps" not in line and "hydra.cc" not in err


def test_a_sweep_with_a_broken_override_names_it_before_any_point_runs(capsys, tmp_path):
    assert main(["-p", PROJECT, "--outputs", str(tmp_path), "-m", "+experiment=micro", "lr=1e-3,", "max_steps=1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: lr=1e-3,: cannot parse this override (")
    assert not (tmp_path / "multirun").exists()


def test_group_the_experiment_does_not_use_is_an_error(capsys, tmp_path):
    project = tmp_path / "p"
    (project / "templates" / "configs").mkdir(parents=True)
    (project / "templates" / "widget").mkdir()
    (project / "meta.yaml").write_text("name: p\n")
    (project / "templates" / "configs" / "plain.yaml").write_text("x: 1\n")
    (project / "templates" / "widget" / "big.yaml").write_text("w: 1\n")
    assert main(["-p", str(project), "+experiment=plain", "--cfg", "widget=big"]) == 2
    assert "does not use group 'widget'" in capsys.readouterr().err


def test_info_lists_groups_and_options(capsys):
    assert main(["-p", PROJECT, "--info"]) == 0
    out = capsys.readouterr().out
    optimizers = re.search(r"^  optimizer: (.*)$", out, re.M).group(1).split(", ")
    assert {"adamw", "adafactor", "adafactor_triton", "galore", "apollo"} <= set(optimizers) and "micro" in out


def test_dry_run_prints_the_launch_command(capsys):
    assert main(["-p", PROJECT, "+experiment=micro", "-d", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("CUDA_VISIBLE_DEVICES=0,1 ") and out.endswith("-m forgather.run -p " + PROJECT + " +experiment=micro -d 0,1")


@pytest.mark.parametrize("override, said", [("max_step=5", "did you mean 'max_steps'"),
                                             ("optimizer=adamm", "adamw")])
def test_dry_run_checks_the_overrides_before_it_prints(capsys, override, said):
    """A dry run printed the launch command of a misspelled override and exited 0; the run then failed."""
    assert main(["-p", PROJECT, "+experiment=micro", override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and said in captured.err


def test_a_computed_value_can_be_replaced_by_a_literal(capsys):
    assert config_of(capsys, "model.vocab_size=512")["model"]["vocab_size"] == 512  # was len(tokenizer)


def test_adding_under_a_node_name_points_to_where_the_node_is(capsys):
    # The node named feedforward_factory is written where the model uses it; `++feedforward_factory.x` would add
    # an unread top-level key.
    error = error_of(capsys, "+experiment=micro", "++feedforward_factory.chunk_tokens=8")
    assert "model.layer_factory.feedforward_factory" in error
    assert "++model.layer_factory.feedforward_factory.chunk_tokens=..." in error
    config = config_of(capsys, "++model.layer_factory.feedforward_factory.chunk_tokens=8")
    assert config["model"]["layer_factory"]["feedforward_factory"]["chunk_tokens"] == 8
    assert "new_variable" in config_of(capsys, "+new_variable=3")  # plain new keys still add


def test_adding_a_top_level_key_that_nothing_reads_warns_and_names_its_option(capsys):
    """A config value added with `+` that no interpolation reads changes nothing: the run goes on with a warning
    that names the group option declaring it, or asks for the spelling."""
    assert main(["-p", PROJECT, "+experiment=micro", "--cfg", "+bucket_size=5", "+bukket=5", "++lr=0.01",
                 "++seed=7"]) == 0
    err = capsys.readouterr().err
    assert ("warning: +bucket_size=5 adds a top-level key that nothing in this config reads; bucket_size is a "
            "config value of optimizer=adamw_in_backward: choose that option") in err
    assert "warning: +bukket=5 adds a top-level key that nothing in this config reads; check its spelling" in err
    assert "++lr" not in err and "++seed" not in err  # read through ${lr} and ${seed}


def test_an_override_through_an_interpolation_is_checked_against_the_targets_signature(capsys):
    # trainer.max_steps holds ${max_steps}: Trainer's annotation (int) decides, at override time.
    error = error_of(capsys, "+experiment=micro", "trainer.max_steps=abc")
    assert error.strip() == "error: trainer.max_steps=abc: pytorch_lightning:Trainer takes max_steps: int; got str 'abc'"


def test_a_scalar_where_the_signature_wants_loggers_is_one_line(capsys):
    error = error_of(capsys, "+experiment=micro", "trainer.logger=5")
    assert error.count("\n") == 1 and "trainer.logger=5: pytorch_lightning:Trainer takes logger: Logger | Iterable[Logger] | bool | None; got int 5" in error


def test_an_override_through_an_interpolation_without_a_signature_is_checked_against_the_interpolated_value(capsys, tmp_path):
    (tmp_path / "templates" / "configs").mkdir(parents=True)
    (tmp_path / "meta.yaml").write_text("name: p\n")
    (tmp_path / "templates" / "configs" / "c.yaml").write_text("table: !call:builtins:dict\n  rows: !var {name: rows, default: 3}\n")
    assert main(["-p", str(tmp_path), "+experiment=c", "--cfg", "table.rows=many"]) == 2
    assert "table.rows=many: table.rows is int (3); got str 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["trainer.logger=false", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1", "trainer.devices=auto", "trainer.max_steps=7"])
def test_values_the_signature_accepts_pass(capsys, override):
    key, value = override.split("=")
    assert str(config_of(capsys, override)["trainer"][key.split(".")[1]]).lower() == value


def test_values_outside_a_literal_annotation_are_refused(capsys):
    assert "takes precision: 64 | 32 | 16 | 'transformer-engine'" in error_of(capsys, "+experiment=micro", "trainer.precision=17")


@pytest.mark.parametrize("override", ["model.vocab_size._args_=5", "++model._args_=5"])
def test_underscore_args_must_be_a_list(capsys, override):
    error = error_of(capsys, "+experiment=micro", override)
    assert "_args_ holds the positional arguments of the node's target, a list; got int" in error and "=[5]" in error


def test_a_template_value_takes_what_the_parameters_it_reaches_accept(capsys):
    """`fused_projections` defaults to "auto" in the template, and the attention and feed-forward take
    `bool | str` (false, "kv"): the value is checked against them, not against the default's type; a value none
    of them takes is still the type error naming the current value (here fused_norm's; a string default, like
    fused_projections', takes `=3`, which the attention's own check then refuses: the next test)."""
    config = config_of(capsys, "fused_projections=kv")
    assert config["fused_projections"] == "kv"
    assert config_of(capsys, "fused_projections=false")["fused_projections"] is False
    assert "fused_norm is bool (True); got str 'kv'" in error_of(capsys, "+experiment=micro", "fused_norm=kv")


def test_a_value_the_attention_refuses_is_a_one_line_error_naming_the_override(capsys, tmp_path):
    """`fused_projections=3` passes the config's check (the default is a string), so the refusal is the
    attention's when the model is built: one line, with the choices and the override that set it."""
    assert main(["-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro", "fused_projections=3",
                 "max_steps=1"]) == 2
    error = capsys.readouterr().err
    assert "error: Attention: fused_projections=3; choose false, true" in error
    assert "set by the override fused_projections=3" in error
