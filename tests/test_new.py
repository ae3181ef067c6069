"""`forgather new`: a project copied from an example, named after its directory, never over another."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from forgather.cli import new
from forgather.project import Project

REPO = Path(__file__).resolve().parents[1]


def run_new(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    new.add_arguments(parser)
    return new.run(parser.parse_args(argv))


def test_new_copies_the_template_project_under_the_directorys_name(tmp_path, capsys):
    assert run_new(str(tmp_path / "my_lm")) == 0
    project = Project.load(str(tmp_path / "my_lm"))
    template = Project.load(str(REPO / "examples" / "template_project"))
    assert project.name == "my_lm" and project.description == template.description
    assert project.configs() == ["default.yaml"] and (tmp_path / "my_lm" / "model_src" / "README.md").is_file()
    assert "forgather -t default.yaml train" in capsys.readouterr().out


def test_the_new_projects_default_config_is_a_training_experiment(tmp_path):
    project = new.create_project(tmp_path / "lm")
    config = project.load_config(None).config
    assert {"trainer", "module", "datamodule"} <= set(config) and config.max_steps == 600


def test_new_refuses_an_existing_directory_and_leaves_it_alone(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert run_new(str(tmp_path / "taken")) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_new_from_another_example_copies_its_templates_and_model_source(tmp_path):
    project = new.create_project(tmp_path / "comp", "project_composition")
    assert project.name == "comp" and project.configs() == ["base.yaml", "sgd.yaml", "wide.yaml"]
    optimizer = project.load_config("sgd.yaml").construct("optimizer")
    assert type(optimizer).__name__ == "SGD"


def test_new_from_a_project_directory_leaves_its_runs_behind(tmp_path):
    source = new.create_project(tmp_path / "first")
    for produced in ("outputs/default/run", "output_models/default", "model_src/__pycache__"):
        (Path(source.root) / produced).mkdir(parents=True)
    copy = new.create_project(tmp_path / "second", source.root)
    assert sorted(p.name for p in Path(copy.root).iterdir()) == ["README.md", "meta.yaml", "model_src", "templates"]
    assert not (Path(copy.root) / "model_src" / "__pycache__").exists()


def test_an_unknown_example_names_the_examples(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no example project 'nope'.*template_project.*tutorials/tiny_llama"):
        new.create_project(tmp_path / "x", "nope")
    assert not (tmp_path / "x").exists()


def test_without_examples_the_error_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="installed wheel"):
        new.create_project(tmp_path / "x", examples_dir=tmp_path / "no_examples")


def test_with_name_replaces_only_the_name_line():
    text = "# keep me\nname: old\ndescription: d\n"
    assert new.with_name(text, "new") == "# keep me\nname: new\ndescription: d\n"


def test_with_name_quotes_names_yaml_would_misread_and_adds_a_missing_name():
    text = new.with_name("description: d\n", "a: b")
    assert yaml.safe_load(text) == {"name": "a: b", "description": "d"}


@pytest.mark.slow
def test_a_new_project_trains_and_exports_its_model(tmp_path, monkeypatch):
    from forgather.cli.main import main

    project = new.create_project(tmp_path / "fresh")
    monkeypatch.chdir(project.root)
    assert main(["-t", "default.yaml", "train", "max_steps=2", "limit_val_batches=1"]) == 0
    assert (tmp_path / "fresh" / "output_models" / "default" / "config.json").is_file()
    assert len(list((tmp_path / "fresh" / "outputs" / "default").iterdir())) == 1
