"""User mistakes on the runner's command line are one line naming what to do; `forgather code` runs as built."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from forgather.graph.codegen import generate_code
from forgather.project import Project
from forgather.run import main
from helpers.template_files import write

RUNNER_PROJECT = str(Path(__file__).parent / "fixtures" / "runner_project")


@pytest.mark.parametrize("devices", ["a,b", "0,,1", ""])
def test_bad_device_list_is_one_line(devices, capsys):
    assert main(["-p", RUNNER_PROJECT, "+experiment=micro", "-d", devices, "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -d {devices!r}: not a list of GPU indices") and err.count("\n") == 1


@pytest.mark.parametrize("devices", ["1", "0,1", "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "MIG-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901,0"])
def test_device_indices_and_uuids_are_taken(devices, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # -d sets it in this process: put back after the test
    assert main(["-p", RUNNER_PROJECT, "+experiment=micro", "-d", devices, "--cfg", "job"]) == 0


def test_group_chosen_twice_is_refused(capsys):
    assert main(["-p", RUNNER_PROJECT, "+experiment=micro", "+experiment=tiny_llama", "--cfg", "job"]) == 2
    err = capsys.readouterr().err
    assert "group 'experiment' is already chosen (experiment=micro)" in err and "Traceback" not in err


def test_group_chosen_twice_alike_is_accepted(capsys):
    assert main(["-p", RUNNER_PROJECT, "+experiment=micro", "+experiment=micro", "--cfg", "job"]) == 0


def test_a_misspelled_cfg_part_is_refused_with_the_close_one(capsys):
    """`--cfg jbo` was taken for an override and refused as one that cannot be parsed."""
    with pytest.raises(SystemExit) as caught:
        main(["-p", RUNNER_PROJECT, "+experiment=micro", "--cfg", "jbo"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --cfg takes job, hydra, all (or nothing: job), not 'jbo'; did you mean 'job'?")


def test_cfg_followed_by_an_override_still_takes_it(capsys):
    assert main(["-p", RUNNER_PROJECT, "+experiment=micro", "--cfg", "max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_generated_code_names_parameters_apart_from_imports_and_keywords(tmp_path):
    project = tmp_path / "p"
    write(project, {"meta.yaml": "name: p\n", "templates/configs/c.yaml":
        "len: 5\nclass: 3\nmy-key: 4\ndict_1: 9\nx: !call:builtins:len [[1, 2, 3]]\ny: !var len\nz: !var class\n"
        "w: !var my-key\ns: &s !call:builtins:dict {a: 1}\nu: !var dict_1\nv: !call:builtins:list [[*s]]\n"
        "p: !partial:builtins:max [1]\n"})
    loaded = Project.load(str(project)).load_config("c.yaml")
    source = tmp_path / "generated.py"
    source.write_text(generate_code(loaded.config))
    spec = importlib.util.spec_from_file_location("generated", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built, expected = module.construct(), loaded.construct(None)
    assert {k: v for k, v in built.items() if k != "p"} == {k: v for k, v in expected.items() if k != "p"}
    assert built["p"](7) == expected["p"](7) == 7


@pytest.mark.parametrize("what", ["missing", "file"])
def test_ls_of_a_directory_that_is_not_one_is_named(tmp_path, capsys, what):
    """`forgather ls -r /typo` said "no projects found", as for a directory without projects."""
    from forgather.cli.main import main as forgather_main

    target = tmp_path / "notes.txt"
    if what == "file":
        target.write_text("mine")
    assert forgather_main(["ls", "-r", str(target)]) == 2
    reason = "a file, not a directory" if what == "file" else "no such directory"
    assert capsys.readouterr().err == f"error: {target}: {reason}; give the directory to look for projects in\n"
